"""Lowering: a StagedProgram -> one plan file (export, AOTInductor or ONNX, weights once, manifest).

Example inputs for each stage come from a shape walk over the program: constants are real,
empty latents and sampler outputs are zeros of the right shape, module stages run on fake
tensors. Walking at the declared inputs' minimum and maximum tells which stage dims the
runtime inputs drive and over what range (those must stay dynamic). Batch and spatial dims
are made dynamic even when nothing drives them, so stages that differ only in size (the
denoiser of txt2img and of HiRes fix) compile to one cached artifact; a stage that cannot be
exported that way is exported again with only the driven dims dynamic.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch._dynamo.exc import UserError

from kiln.compiler.lower.cache import compiled_artifact
from kiln.compiler.lora_targets import lora_table
from kiln.compiler.lower.export import (ArgSpec, ShapeRangeError, aoti_compile, check_ranges, constant_tensors,
                                        dim_ranges, export_module)
from kiln.compiler.lower.onnx_export import OPSET, initializer_names, onnx_compile
from kiln.compiler.lower.ort_optimize import NotOptimized, OptimizedGraph, bind_to_plan, optimize_for_cpu
from kiln.compiler.stages import Stage, StagedProgram
from kiln.kernels.errors import KilnError, Problem
from kiln.kernels.prompt_syntax import MAX_LENGTH
from kiln.nodes.models.tokenizer import clip_merge_file
from kiln.nodes.plan import NeedsStaticShapes
from kiln.runtime.artifacts import cached_artifact, constant_fqns
from kiln.runtime.kinds import KINDS
from kiln.runtime.kinds.sample import BOUND_PREFIX, sdxl_y
from kiln.runtime.lora import LORA_MEMBER
from kiln.runtime.manifest import FP16_WEIGHTS, RuntimeInput
from kiln.runtime.ort import nchwc_block_size, onnxruntime
from kiln.runtime.plan_file import digest_of
from kiln.runtime.prompts import VOCABULARY_MEMBER
from kiln.runtime.writer import PlanWriter

Progress = Callable[[str, int, int], None]

# Ranges offered for dims no runtime input drives (export narrows them to what the code takes).
BATCH_RANGE = (1, 64)
LATENT_RANGE = (1, 1024)
PIXEL_RANGE = (1, 8192)
# The denoiser's example latent side when its size is dynamic: the UNet halves it at each level,
# and a level traced at 1x1 lets the compiler assume strides that differ at other sizes.
EXAMPLE_LATENT_SIDE = 16
# A runtime prompt: 77-token chunks (ComfyUI concatenates them on the token axis); the denoiser
# takes both prompts repeated to the common multiple of their lengths, so it takes more.
CHUNK_RANGE = (1, 32)
CONTEXT_CHUNK_RANGE = (1, 128)
TOKENS_PER_CHUNK = MAX_LENGTH


def lower(program: StagedProgram, output: Path, cache: Path, progress: Progress | None = None) -> Path:
    """Export and compile every sample/module stage for the target's backend (AOTInductor, or
    ONNX with the opset recorded in the target, CPU graphs then optimized for onnxruntime), then
    write the plan to ``output``; compiled artifacts are cached under ``cache``."""
    walks = _Walks(program)
    onnx = program.target["backend"] == "onnx"
    target = {**program.target, "onnx_opset": OPSET} if onnx else dict(program.target)
    fp16_weights = target.get("weights") == FP16_WEIGHTS
    compiled = [s for s in program.stages if KINDS[s.kind].compiled]
    artifacts, stage_constants, taken = {}, {}, {}
    for index, stage in enumerate(compiled):
        _report(progress, stage.name, index, len(compiled))
        ep, labels = _export(stage, walks)
        taken[stage.name] = _taken_dims(stage, labels, ep)
        data, _ = compiled_artifact(ep, target, cache, onnx_compile if onnx else aoti_compile)
        names = set(initializer_names(data) if onnx else constant_fqns(cached_artifact(data, digest_of(data), cache),
                                                                       target["device"]))
        stage_constants[stage.name] = {fqn: t for fqn, t in constant_tensors(ep).items() if fqn in names}
        artifacts[stage.name] = data
        del ep
    table = lora_table(program.patchable, stage_constants)
    writer = PlanWriter(output, backend=target["backend"], cache=cache, fp16_weights=fp16_weights)
    if table is not None:
        writer.add_file(LORA_MEMBER, json.dumps(table, sort_keys=True).encode())
    with tempfile.TemporaryDirectory(prefix="kiln-ort-") as scratch:   # the optimized graphs' tensors live here
        optimized, done = {}, {}
        if onnx and target["device"] == "cpu":
            block = nchwc_block_size()
            for index, (name, data) in enumerate(artifacts.items()):
                _report(progress, f"{name} onnxruntime", index, len(artifacts))
                key = (data, tuple((fqn, t.data_ptr(), tuple(t.shape)) for fqn, t in stage_constants[name].items()),
                       frozenset(_patchable(table, name)))
                if key not in done:   # both samplers of HiRes fix: one optimized graph, one session
                    done[key] = _optimized(name, data, stage_constants[name], key[2], block, Path(scratch) / name)
                optimized[name] = done[key]
            if any(optimized.values()):
                target["onnx_cpu"] = {"onnxruntime": onnxruntime().__version__, "nchwc_block": block}
        for name, data in artifacts.items():
            graph = optimized.get(name)
            if graph is None:
                writer.add_artifact(name, data, stage_constants[name], constant_names=list(stage_constants[name]))
            else:
                writer.add_artifact(name, graph.model, graph.weights, constant_names=list(graph.weights),
                                    relayouts=graph.relayouts, bind=None if fp16_weights else bind_to_plan)
        _report(progress, "plan", len(compiled), len(compiled))
        return _write(writer, program, target, walks, taken)


def _report(progress: Progress | None, name: str, index: int, total: int) -> None:
    if progress is not None:
        progress(name, index, total)


def _optimized(name: str, data: bytes, weights: dict, patchable: set[str], block: int,
               scratch: Path) -> OptimizedGraph | None:
    """The stage's graph optimized for onnxruntime's CPU provider, or None (with a notice) when a
    weight a LoRA may patch cannot be followed through onnxruntime's optimizations."""
    try:
        return optimize_for_cpu(data, weights, patchable, block, scratch)
    except NotOptimized as reason:
        print(f"kiln: notice: stage {name} is stored unoptimized ({reason}); onnxruntime optimizes it each "
              "time the plan loads", file=sys.stderr)
        return None


def _patchable(table: dict | None, stage_name: str) -> set[str]:
    """The FQNs of a stage that a LoRA applied at load may patch (lora.json's places)."""
    return {fqn for group in (table or {}).get("groups", []) for target in group["targets"].values()
            for stage, fqn in target["at"] if stage == stage_name}


def _write(writer: PlanWriter, program: StagedProgram, target: dict, walks: "_Walks", taken: dict) -> Path:
    writer.add_constants(program.constants)
    if any(s.kind == "tokenize" for s in program.stages):
        writer.add_file(VOCABULARY_MEMBER, clip_merge_file())
    image_shapes = {s.name: _image_shapes(s, walks, taken) for s in program.stages if s.kind == "load_image"}
    return writer.write({
        "target": target, "workflow": program.workflow,
        "inputs": [dataclasses.asdict(i) for i in program.inputs],
        "stages": [{"name": s.name, "kind": s.kind, "node_ids": list(s.node_ids), "inputs": dict(s.inputs),
                    "outputs": dict(s.outputs), "params": {**_params(s, program), **image_shapes.get(s.name, {})}}
                   for s in program.stages],
        "folded": list(program.folded), "dropped_models": list(program.dropped_models)})


def _params(stage: Stage, program: StagedProgram) -> dict:
    """The stage's params, with what lowering decides: a tokenize stage's vocabulary member and
    chunk limit; for a sampler fed a runtime prompt ``max_context_tokens``: the runtime repeats
    both prompts' embeddings to their common multiple length (ComfyUI's ``CONDCrossAttn.concat``)
    before calling the denoiser, which takes them at equal length, up to that many tokens."""
    params = dict(stage.params)
    if stage.kind == "tokenize":
        params.update(vocabulary=VOCABULARY_MEMBER, max_chunks=CHUNK_RANGE[1])
    if stage.kind == "sample" and not stage.params.get("guided") and not _constant_contexts(stage, program.constants):
        params["max_context_tokens"] = CONTEXT_CHUNK_RANGE[1] * TOKENS_PER_CHUNK
    return params


def _taken_dims(stage: Stage, labels: list[str], ep) -> dict[str, dict]:
    """env name -> what the artifact takes of each dim of that input (a size, or a (min, max))."""
    names = {**stage.inputs, "x": stage.inputs.get("latent")}
    return {names[label]: dims for label, dims in zip(labels, dim_ranges(ep)) if names.get(label)}


def _image_shapes(stage: Stage, walks: "_Walks", taken: dict[str, dict]) -> dict:
    """A ``load_image`` stage's ``shapes``: height and width free (null) when every value a
    differently sized image changes reaches the compiled stages in dims they take at any size;
    else the workflow image's sizes, which the runtime then asks for."""
    resized = walks.resized(stage, grow=8)
    changed = {name: [d for d, (a, b) in enumerate(zip(t.shape, walks.fixed[name].shape)) if a != b]
               for name, t in resized.items() if name in walks.fixed and t.shape != walks.fixed[name].shape}
    free = all(not isinstance(dims.get(d), int) for stage_dims in taken.values()
               for name, dims in stage_dims.items() for d in changed.get(name, ()))
    return {"shapes": _spatial(stage.params["shapes"], lambda d, n: None)} if free else {}


def _spatial(shapes: dict[str, list], change) -> dict[str, list]:
    """A load_image stage's shapes with ``change(dim, size)`` applied to the height and width of
    each output that has the image's (a mask without alpha is 64x64 whatever the image)."""
    image = shapes.get("image") or shapes["mask"] + [3]
    return {local: [change(d, n) if d in (1, 2) and shape[1:3] == image[1:3] else n for d, n in enumerate(shape)]
            for local, shape in shapes.items()}


def _constant_contexts(stage: Stage, constants: dict) -> bool:
    return all(stage.inputs[k] in constants for k in ("cond_context", "uncond_context"))


# --- the shape walk ------------------------------------------------------------------------
class _Walks:
    """Example environments of the program at several settings of its size inputs.

    ``fixed``: defaults, a runtime batch size raised to 2 where its range allows (dynamic dims
    need examples >= 2): the examples of a stage exported with only driven dims dynamic;
    ``example``: the same with every batch at least 2; ``low``/``high``: size inputs at their
    minimum / maximum.
    """

    def __init__(self, program: StagedProgram):
        self.program = program
        self.device = torch.device(program.target["device"])
        empties = [s for s in program.stages if s.kind == "empty_latent"]
        batches = {s.inputs["batch_size"] for s in empties if "batch_size" in s.inputs}
        sizes = {env for s in empties for env in s.inputs.values()}
        self.size_inputs = [i for i in program.inputs if i.env in sizes]
        self.layouts = program.layouts
        fixed = {i.env: max(i.default, min(2, i.max)) if i.env in batches else i.default for i in self.size_inputs}
        self._fixed_sizes = fixed
        self.example = self._walk(fixed, raise_batch=True)
        self.fixed = self._walk(fixed, raise_batch=False)
        self.low = self._walk({i.env: i.min for i in self.size_inputs}, raise_batch=False)
        self.high = self._walk({i.env: i.max for i in self.size_inputs}, raise_batch=False)

    def resized(self, stage: Stage, grow: int) -> dict[str, torch.Tensor]:
        """The ``fixed`` walk with load_image ``stage``'s image (and a mask of its size) ``grow``
        pixels higher and wider."""
        shapes = _spatial(stage.params["shapes"], lambda d, n: n + grow)
        return self._walk(self._fixed_sizes, raise_batch=False,
                          replaced={stage.name: dataclasses.replace(stage, params={**stage.params, "shapes": shapes})})

    def driven(self, name: str) -> dict[int, tuple[int, int]]:
        """Dims of env value ``name`` that the size inputs change, with their (min, max)."""
        shapes = [w[name].shape for w in (self.low, self.high, self.fixed)]
        return {d: (min(s[d] for s in shapes), max(s[d] for s in shapes))
                for d in range(len(shapes[0])) if len({s[d] for s in shapes}) > 1}

    def _walk(self, sizes: dict[str, int], *, raise_batch: bool,
              replaced: dict[str, Stage] | None = None) -> dict[str, torch.Tensor]:
        env = {name: t.to(self.device) for name, t in self.program.constants.items()}
        env.update({i.env: _input_tensor(i, sizes.get(i.env, i.default)) for i in self.program.inputs
                    if i.type in ("INT", "FLOAT", "BOOLEAN")})
        for stage in self.program.stages:
            stage = (replaced or {}).get(stage.name, stage)
            inputs = {local: env[name] for local, name in stage.inputs.items() if name in env}
            outputs = KINDS[stage.kind].example_outputs(stage, inputs, module=stage.module,
                                                        min_batch=2 if raise_batch else 1, device=self.device)
            env.update({stage.outputs[local]: value for local, value in outputs.items() if local in stage.outputs})
        return env


def _input_tensor(i: RuntimeInput, value) -> torch.Tensor:
    if i.type == "INT":
        return torch.tensor(int(value), dtype=torch.int64)
    if i.type == "BOOLEAN":
        return torch.tensor(bool(value))
    return torch.tensor(float(value), dtype=torch.float32)


# --- per-stage arguments and export --------------------------------------------------------
def _free_dims(name: str, tensor: torch.Tensor, walks: _Walks) -> dict[int, tuple[int, int]]:
    """Batch and spatial dims of a LATENT (NCHW) or IMAGE/MASK (N,H,W[,C]) value, chunks of a prompt."""
    layout = walks.layouts.get(name)
    if layout == "tokens":
        return {1: CHUNK_RANGE}
    if layout == "latent" and tensor.ndim == 4:
        return {0: BATCH_RANGE, 2: LATENT_RANGE, 3: LATENT_RANGE}
    if layout == "image" and tensor.ndim in (3, 4) and tensor.is_floating_point():
        return {0: BATCH_RANGE, 1: PIXEL_RANGE, 2: PIXEL_RANGE}
    return {}


def _required(name: str, walks: _Walks) -> dict[int, tuple[int, int]]:
    """Dims that must stay dynamic: those the size inputs drive, a runtime prompt's chunk count."""
    return {1: CHUNK_RANGE} if walks.layouts.get(name) == "tokens" else walks.driven(name)


def _arg(example: torch.Tensor, free: dict[int, tuple[int, int]], required: dict[int, tuple[int, int]],
         opportunistic: bool) -> ArgSpec:
    dims = dict(required)
    if opportunistic:
        for d, (lo, hi) in free.items():
            if d not in dims and example.shape[d] >= 2:
                dims[d] = (lo, hi)
            elif d in dims:
                dims[d] = (min(lo, dims[d][0]), max(hi, dims[d][1]))
    return ArgSpec(example, dims, required)


def _stage_args(stage: Stage, walks: _Walks, opportunistic: bool) -> tuple[list[ArgSpec], list[str]]:
    env = walks.example if opportunistic else walks.fixed
    if stage.kind == "module":
        names = list(stage.inputs.values())
        return ([_arg(env[n], _free_dims(n, env[n], walks), _required(n, walks), opportunistic) for n in names],
                list(stage.inputs))
    latent_name = stage.inputs["latent"]
    latent = env[latent_name]
    x_required = walks.driven(latent_name)
    cfg = stage.inputs.get("cfg")
    cfg_arg = ArgSpec(env[cfg].float() if cfg else torch.tensor(float(stage.params["cfg"])), {}, {})
    if stage.params.get("guided"):   # areas and masks resolve at one latent size: nothing dynamic
        fixed = walks.fixed[latent_name]
        x = ArgSpec(torch.zeros(fixed.shape, dtype=torch.float32, device=fixed.device), {}, x_required)
        sigma = ArgSpec(torch.linspace(1.0, 2.0, fixed.shape[0], device=fixed.device), {},
                        {0: x_required[0]} if 0 in x_required else {})
        tensors = [ArgSpec(env[stage.inputs[name]], {}, {}) for name in stage.module.inputs[3:]]
        return [x, sigma, cfg_arg, *tensors], list(stage.module.inputs)
    x_free = {0: BATCH_RANGE, 2: LATENT_RANGE, 3: LATENT_RANGE}
    shape = ([max(2, latent.shape[0]), latent.shape[1], *(max(EXAMPLE_LATENT_SIDE, n) for n in latent.shape[2:])]
             if opportunistic else list(latent.shape))
    x = _arg(torch.zeros(shape, dtype=torch.float32, device=latent.device), x_free, x_required, opportunistic)
    sigma = ArgSpec(torch.linspace(1.0, 2.0, shape[0], device=latent.device),
                    {0: x.dynamic[0]} if 0 in x.dynamic else {}, {0: x_required[0]} if 0 in x_required else {})
    args = [x, sigma] + _context_args(stage, env, walks.program.constants)
    args.append(cfg_arg)
    if "sdxl" in stage.params:
        args += [ArgSpec(sdxl_y(stage.params["sdxl"], side, env[stage.inputs[f"{side}_pooled"]], shape), {}, {})
                 for side in ("cond", "uncond")]
    args += [ArgSpec(env[stage.inputs[name]], {}, {}) for name in stage.inputs if name.startswith(BOUND_PREFIX)]
    if stage.params.get("inpaint"):   # mask + masked image channels, sized as x
        concat = torch.zeros([shape[0], shape[1] + 1, *shape[2:]], device=latent.device)
        args.append(_arg(concat, x_free, x_required, opportunistic))
    return args, list(stage.module.inputs)


def _context_args(stage: Stage, env: dict, constants: dict) -> list[ArgSpec]:
    """Prompt embeddings: fixed when both are constants (the denoiser then matches ComfyUI's
    handling of different lengths itself); with a runtime prompt the token count is dynamic and
    the runtime repeats both to their common multiple first, as ComfyUI does, so they are
    exported at equal length."""
    names = [stage.inputs[k] for k in ("cond_context", "uncond_context")]
    if _constant_contexts(stage, constants):
        return [ArgSpec(env[n], {}, {}) for n in names]
    contexts = [env[n] for n in names]
    length = math.lcm(*(c.shape[1] for c in contexts))
    tokens = (CONTEXT_CHUNK_RANGE[0] * TOKENS_PER_CHUNK, CONTEXT_CHUNK_RANGE[1] * TOKENS_PER_CHUNK)
    return [ArgSpec(c.repeat(1, length // c.shape[1], 1), {1: tokens}, {1: tokens}) for c in contexts]


def _export(stage: Stage, walks: _Walks):
    """Export with opportunistic dynamic dims, else with only the driven ones; KilnError if
    neither. Returns the program and its inputs' labels."""
    failure = None
    for opportunistic in (True, False):
        args, labels = _stage_args(stage, walks, opportunistic)
        try:
            ep = export_module(stage.module, args)
            check_ranges(ep, args, labels)
            return ep, labels
        except NeedsStaticShapes as error:
            failure = error.problem
        except (ShapeRangeError, UserError) as error:
            failure = Problem("unsupported_in_plan", f"stage {stage.name} cannot take every size the declared "
                              f"inputs allow: {str(error).splitlines()[0]}", node_id=stage.node_ids[0])
    raise KilnError([failure, Problem("unsupported_in_plan", _range_hint(walks.size_inputs))])


def _range_hint(size_inputs: list[RuntimeInput]) -> str:
    if not size_inputs:
        return "the stage could not be exported for its sizes"
    declared = ", ".join(f"{i.name}={i.min}..{i.max}" for i in size_inputs)
    return f"sizes are runtime inputs ({declared}); narrow the ranges or make them constants"
