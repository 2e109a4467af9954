"""Running a loaded plan: bind runtime inputs, run the stages in order over the environment.

The environment maps names (docs/plans.md) to values: folded constants (``const.*``), runtime
inputs (``in.<node>.<input>``, kept as Python scalars so a 64-bit seed never wraps) and stage
outputs, each freed after the last stage that reads it.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from kiln.kernels.errors import Interrupted
from kiln.kernels.settings import Settings
from kiln.runtime.errors import PlanError
from kiln.runtime.images import WrittenImages
from kiln.runtime.kinds import StageContext, kind_of
from kiln.runtime.manifest import Manifest, RuntimeInput, StageSpec
from kiln.runtime.plan import LoadedPlan


@dataclass
class StageTiming:
    name: str
    kind: str
    node_ids: list[str]
    seconds: float


@dataclass
class PlanRun(WrittenImages):
    timings: list[StageTiming] = field(default_factory=list)
    kept: dict[str, Any] = field(default_factory=dict)   # the environment values asked for with ``keep``


def run_plan(plan: LoadedPlan, values: Mapping[str, Any] | None = None, *, output_dir: str | Path = "output",
             on_step: Callable[[str, int, int], None] | None = None, settings: Settings = Settings(),
             prompt: dict | None = None, extra_pnginfo: dict | None = None,
             on_stage: Callable[[StageSpec], None] | None = None,
             on_preview: Callable[[str, Any, float], None] | None = None,
             lora_dirs: Sequence[str | Path] = (), input_dir: str | Path | None = None,
             on_model_call: Callable[[], None] | None = None, keep: Sequence[str] = ()) -> PlanRun:
    """Run every stage with the runtime inputs ``values`` ({"3.seed": 7, ...}; others default).

    ``on_step(stage_name, step, total)`` reports sampler progress, ``on_stage(stage)`` each stage
    before it runs (either may raise ``Interrupted`` to stop), ``on_preview(stage_name, denoised,
    scale_factor)`` each sampler step's prediction. Saved PNGs carry ``prompt`` (by default the
    plan's workflow with the input values) and the ``extra_pnginfo`` chunks. ``lora_dirs``: where
    the plan's ``lora`` stages find the files their runtime ``lora_name`` names; ``input_dir``:
    where its ``load_image`` stages find the runtime ``image`` files; ``on_model_call()`` is
    called before each evaluation of a sampler's denoiser; ``keep`` names environment values
    (stage outputs) to return in ``PlanRun.kept`` (kiln bench compares the sampled latents).
    """
    manifest = plan.manifest
    bound = bind_inputs(manifest, values or {})
    declared = {spec.name: spec for spec in manifest.inputs}
    env: dict[str, Any] = {**plan.constants, **{declared[name].env: v for name, v in bound.items()}}
    kept = set(env) | set(keep)   # constants and inputs are cheap to keep; stage outputs are freed
    last_use = {}
    for index, stage in enumerate(manifest.stages):
        for name in (*stage.outputs.values(), *stage.inputs.values()):
            last_use[name] = index
    ctx = StageContext(device=plan.device, compiled=plan.compiled, output_dir=str(output_dir),
                       prompt=prompt if prompt is not None else workflow_with_inputs(manifest, bound),
                       on_step=on_step, tokenizers=plan.tokenizers, settings=settings,
                       extra_pnginfo=extra_pnginfo, on_preview=on_preview,
                       lora_dirs=tuple(Path(d) for d in lora_dirs),
                       input_dir=None if input_dir is None else Path(input_dir), on_model_call=on_model_call)
    run = PlanRun(images=ctx.images)
    applied: list = []
    lora_nodes = [n for s in manifest.stages if s.kind == "lora" for n in s.node_ids]
    with torch.inference_mode():
        for index, stage in enumerate(manifest.stages):
            args = {local: env[name] for local, name in stage.inputs.items()}
            if kind_of(stage).compiled and ctx.loras != applied:   # the run's LoRAs patch the weights
                start = time.perf_counter()
                ctx.compiled, applied = plan.compiled_with(ctx.loras), list(ctx.loras)
                run.timings.append(StageTiming("lora_patch", "lora", lora_nodes, time.perf_counter() - start))
            if on_stage is not None:
                on_stage(stage)
            start = time.perf_counter()
            try:
                out = kind_of(stage).run(stage, args, ctx)
            except (PlanError, Interrupted):
                raise
            except Exception as exc:  # named with its stage and nodes; the CLI's --debug shows the traceback
                raise PlanError("stage_failed", f"{stage.describe()} failed: {type(exc).__name__}: {exc}") from exc
            run.timings.append(StageTiming(stage.name, stage.kind, stage.node_ids, time.perf_counter() - start))
            for local, name in stage.outputs.items():
                env[name] = out[local]
            for name in (*stage.inputs.values(), *stage.outputs.values()):
                if last_use[name] == index and name not in kept:
                    env.pop(name, None)
    run.kept = {name: env[name] for name in keep if name in env}
    return run


def bind_inputs(manifest: Manifest, values: Mapping[str, Any]) -> dict[str, Any]:
    """Every runtime input's value (given or default), checked against its declaration."""
    declared = {spec.name: spec for spec in manifest.inputs}
    for name in values:
        if name not in declared:
            raise PlanError("invalid_input", "the plan has no runtime input of this name", input_name=name,
                            expected=f"one of {', '.join(declared) or '(none: this plan takes no inputs)'}",
                            found=repr(name), hint="(declare it with `kiln compile --input NODE.INPUT`)")
    return {name: check_input(spec, values.get(name, spec.default)) for name, spec in declared.items()}


def check_input(spec: RuntimeInput, value: Any) -> Any:
    """The value as the input's type (ints accepted for FLOAT), or PlanError naming what was expected."""
    kind = spec.type
    if kind == "INT" and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = {"INT": isinstance(value, int) and not isinstance(value, bool),
          "FLOAT": isinstance(value, (int, float)) and not isinstance(value, bool),
          "BOOLEAN": isinstance(value, bool),
          "STRING": isinstance(value, str),
          "COMBO": spec.choices is not None and value in spec.choices}[kind]
    if not ok:
        expected = f"one of {', '.join(map(repr, spec.choices or []))}" if kind == "COMBO" else \
            {"INT": "an integer", "FLOAT": "a number", "BOOLEAN": "true or false", "STRING": "a string"}[kind]
        raise PlanError("invalid_input", "value has the wrong type" if kind != "COMBO" else "value not in list",
                        input_name=spec.name, expected=expected, found=repr(value))
    if kind == "FLOAT":
        value = float(value)
    if kind in ("INT", "FLOAT") and ((spec.min is not None and value < spec.min)
                                     or (spec.max is not None and value > spec.max)):
        low = "-inf" if spec.min is None else spec.min
        high = "inf" if spec.max is None else spec.max
        raise PlanError("invalid_input", "value outside the range the plan was compiled for", input_name=spec.name,
                        expected=f"{low}..{high}", found=repr(value),
                        hint="(recompile with a wider range, e.g. --input NODE.INPUT=MIN..MAX)")
    return value


def seed_values(manifest: Manifest, seed: int) -> dict[str, int]:
    """``--seed``: the value for every sampler's seed input, as the interpreter sets it."""
    names = [spec.name for spec in manifest.inputs if spec.seed]
    if not names:
        raise PlanError("invalid_input", "--seed was given but the plan has no seed input", input_name="seed",
                        expected="a plan with a sampler seed input",
                        found=f"inputs {', '.join(s.name for s in manifest.inputs) or '(none)'}")
    return {name: seed for name in names}


def workflow_with_inputs(manifest: Manifest, values: Mapping[str, Any]) -> dict:
    """The source workflow with the runtime input values in it: the ``prompt`` saved PNGs carry,
    so the embedded workflow reproduces the image."""
    workflow = copy.deepcopy(manifest.workflow)
    for spec in manifest.inputs:
        node = workflow.get(spec.node_id)
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict):
            node["inputs"][spec.input_name] = values[spec.name]
    return workflow
