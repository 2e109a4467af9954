"""Reading plan files: open, verify everything, then load.

``load_plan`` refuses a plan before running anything when the file is not a zip, is truncated,
has the wrong format version, was built by another torch (AOTInductor) or onnxruntime (ONNX
graphs optimized for its CPU provider), targets a device this machine lacks (a GPU, or a CPU
whose NCHWc block differs), misses a member or has a member whose BLAKE3 digest differs from the
manifest, and says which. Weights and constants are memory-mapped straight out of the
(uncompressed, aligned) zip; optimized ONNX graphs have onnxruntime map theirs from the file.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from kiln.kernels.clip_bpe import ClipBpe
from kiln.kernels.settings import Settings
from kiln.runtime.artifacts import CompiledStage, cached_artifact
from kiln.runtime.dataflow import check_dataflow
from kiln.runtime.errors import PlanError
from kiln.runtime.kinds import KINDS
from kiln.runtime.lora import LORA_MEMBER, LoraSpec, lora_overrides, read_table
from kiln.runtime.manifest import (ARTIFACT_SUFFIXES, CONSTANTS_MEMBER, FP16_WEIGHTS, WEIGHTS_MEMBER,
                                   Manifest)
from kiln.runtime.ort import CPU, OnnxStage, choose_providers, nchwc_block_size, onnxruntime, provider_device
from kiln.runtime.ort_layouts import originals, relaid, relayouts
from kiln.runtime.plan_file import PlanFile, plural
from kiln.runtime.tensor_files import mapped_tensors

class PlanReader(PlanFile):
    """A plan file opened for reading, with the checks and views that need torch and onnxruntime."""

    @classmethod
    def of(cls, source: str | Path | PlanFile) -> "PlanReader":
        """A reader for a path, or for a PlanFile already opened (and maybe being verified)."""
        if not isinstance(source, PlanFile):
            return cls(source)
        reader = cls.__new__(cls)
        reader.__dict__.update(source.__dict__)
        return reader

    def check_compatible(self) -> None:
        """Backend, torch version (AOTInductor) and target device against this process."""
        m = self.manifest
        if m.target["backend"] not in ARTIFACT_SUFFIXES:
            raise PlanError("invalid_plan", "the plan uses a backend this runtime cannot run",
                            expected=" or ".join(ARTIFACT_SUFFIXES), found=repr(m.target["backend"]))
        if m.target["backend"] == "onnx":
            self._check_onnx()
            return
        if _release(m.torch_version) != _release(torch.__version__):
            raise PlanError("plan_version_mismatch", "the plan was compiled with another torch version",
                            expected=f"torch {m.torch_version}", found=f"torch {torch.__version__}",
                            hint="(recompile the plan with this torch)")
        device = torch.device(m.target["device"])
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count <= (device.index or 0):
                raise PlanError("plan_device_unavailable",
                                f"the plan targets {m.target['device']} but torch sees no such CUDA device",
                                expected=m.target["device"], found=f"{count} CUDA device(s)",
                                hint="(compile a plan for this machine with --device cpu)")
        elif device.type != "cpu":
            raise PlanError("plan_device_unavailable", "the plan targets a device this runtime does not support",
                            expected="cpu or cuda", found=repr(m.target["device"]))
    def _check_onnx(self) -> None:
        """onnxruntime present; a CUDA plan without a GPU here falls back to the CPU provider;
        graphs optimized at compile time need the onnxruntime and the CPU layout they were made for."""
        ort = onnxruntime()
        device = self.manifest.target["device"]
        if device != "cpu" and not device.startswith("cuda"):
            raise PlanError("plan_device_unavailable", "the plan targets a device this runtime does not support",
                            expected="cpu or cuda", found=repr(device))
        made_for = self.manifest.target.get("onnx_cpu")
        if made_for is None:
            return
        recompile = "(recompile the plan on this machine with kiln compile --backend onnx)"
        if made_for.get("onnxruntime") != ort.__version__:
            raise PlanError("plan_version_mismatch", "the plan's graphs were optimized for another onnxruntime",
                            expected=f"onnxruntime {made_for.get('onnxruntime')}",
                            found=f"onnxruntime {ort.__version__}", hint=recompile)
        if made_for.get("nchwc_block") != nchwc_block_size():
            raise PlanError("plan_device_unavailable", "the plan's graphs were optimized for a CPU with another "
                            "convolution layout (NCHWc block size)", expected=f"block {made_for.get('nchwc_block')}",
                            found=f"block {nchwc_block_size()} on this CPU", hint=recompile)
    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A safetensors member as CPU tensors viewing the mapped file (no copy)."""
        start, end = self.member_range(name)
        try:
            return mapped_tensors(self._map, start, end)
        except ValueError as exc:
            raise PlanError("invalid_plan", f"member {name} is not a readable safetensors file ({exc})") from None


@dataclass
class LoadedPlan:
    """A verified plan ready to run: constants, compiled stages with their weights, the device."""

    path: Path
    manifest: Manifest
    device: torch.device
    constants: dict[str, torch.Tensor]
    compiled: dict[str, CompiledStage | OnnxStage]
    member_sizes: dict[str, int]
    load_seconds: float
    providers: list[str] = field(default_factory=list)   # ONNX plans: onnxruntime's, best first
    tokenizers: dict[str, ClipBpe] = field(default_factory=dict)   # vocabulary member -> tokenizer
    loras: tuple[LoraSpec, ...] = ()                     # applied to the weights at load
    patch_seconds: float = 0.0                           # of load_seconds, reading and applying them
    stage_loader: "_StageLoader | None" = None

    def compiled_with(self, loras: Sequence[LoraSpec]) -> dict[str, CompiledStage | OnnxStage]:
        """The compiled stages with ``loras`` (a run's ``lora`` stages) applied before the
        plan's load-time ones; the plain ones when there are none."""
        if not loras:
            return self.compiled
        return self.stage_loader.load(tuple(loras) + self.loras)[0]


def load_plan(path: str | Path | PlanFile, provider: str | None = None, settings: Settings = Settings(),
              loras: Sequence[LoraSpec] = (), progress: Callable[[str, int, int], None] | None = None,
              prepack: bool = True) -> LoadedPlan:
    """Verify (format, versions, device, member hashes), then map weights, apply ``loras`` to
    them (``kiln.runtime.lora``) and load the artifacts; ``progress(stage name, index, total)``
    before each artifact loads (a big plan takes seconds), ``("plan", total, total)`` at the end.

    ``provider`` forces an onnxruntime execution provider for an ONNX plan (``cuda``,
    ``TensorrtExecutionProvider``, ...): PlanError when it is not available, never a fallback.
    ``prepack`` False opens ONNX sessions without packing weights for the matrix kernels: the
    first image comes sooner, later ones slower (kiln.runtime.ort.session_options); for a process
    that makes one image.
    AOTInductor packages are extracted to the settings' cache folder (the loader opens files).
    """
    start = time.perf_counter()
    reader = PlanReader.of(path)
    reader.check_compatible()
    reader.verify_members()
    manifest = reader.manifest
    constants = reader.tensors(CONSTANTS_MEMBER)
    check_dataflow(manifest, constants)
    onnx = manifest.target["backend"] == "onnx"
    providers = _providers(manifest, provider)
    device = provider_device(providers, manifest.target["device"]) if onnx else torch.device(manifest.target["device"])
    weights = reader.tensors(WEIGHTS_MEMBER)
    if manifest.target.get("weights") == FP16_WEIGHTS:   # stored halved; the stages compute in fp32
        weights = {key: t.float() if t.dtype == torch.float16 else t for key, t in weights.items()}
    if device.type != "cpu" and not onnx:   # onnxruntime moves initializers itself
        weights = {key: tensor.to(device) for key, tensor in weights.items()}
    stages = _StageLoader(reader, weights, device, providers, settings, prepack)
    compiled, patch_seconds = stages.load(tuple(loras), progress)
    sizes = {name: info.file_size for name, info in reader.entries.items()}
    return LoadedPlan(reader.path, manifest, device, constants, compiled, sizes, time.perf_counter() - start,
                      providers, _tokenizers(reader), tuple(loras), patch_seconds, stages)


class _StageLoader:
    """Loads the compiled stages over the plan's weights, with LoRAs applied to them: at load,
    and again when a run names other LoRAs (``lora`` stages). Stages a LoRA leaves alone are
    loaded once and shared by every variant; the last ``VARIANTS`` patched variants are kept."""

    VARIANTS = 2

    def __init__(self, reader: PlanReader, weights: dict[str, torch.Tensor], device: torch.device,
                 providers: list[str], settings: Settings, prepack: bool = True):
        self.reader, self.weights, self.device, self.providers, self.settings = (reader, weights, device,
                                                                                 providers, settings)
        self.prepack = prepack
        self._table: dict | None = None   # lora.json, read when a LoRA is first applied (not at every load)
        self.stages = {stage.name: stage for stage in reader.manifest.stages}
        self.relayouts = {stage.name: relayouts(stage.relayouts) for stage in reader.manifest.stages}
        self.holders = {stage.name: originals(stage.constant_names, self.relayouts[stage.name])
                        for stage in reader.manifest.stages}
        self.unpatched: dict[tuple, CompiledStage | OnnxStage] = {}
        self.variants: OrderedDict[tuple, dict] = OrderedDict()

    def load(self, loras: tuple[LoraSpec, ...], progress: Callable[[str, int, int], None] | None = None
             ) -> tuple[dict[str, CompiledStage | OnnxStage], float]:
        """(stage name -> loaded stage, seconds spent reading and applying the LoRAs)."""
        key = tuple(spec.identity() for spec in loras)
        if key in self.variants:
            self.variants.move_to_end(key)
            return self.variants[key], 0.0
        manifest = self.reader.manifest
        start = time.perf_counter()
        if loras and self._table is None and LORA_MEMBER in self.reader.entries:
            self._table = read_table(self.reader.member(LORA_MEMBER))
        overrides = lora_overrides(self.original, self._table, loras)
        patch_seconds = time.perf_counter() - start
        compiled, patched_loaded = {}, {}   # stages sharing an artifact and its weights share one loaded model
        artifacts = [stage for stage in manifest.stages if stage.artifact is not None]
        for index, stage in enumerate(artifacts):
            if progress is not None:
                progress(stage.name, index, len(artifacts))
            absent = sorted(k for k in stage.constant_names.values() if k not in self.weights)
            if absent:
                raise PlanError("invalid_plan", f"{stage.describe()} needs weights missing from {WEIGHTS_MEMBER}",
                                found=", ".join(absent[:8]))
            patched = relaid(overrides.get(stage.name, {}), stage.constant_names, self.relayouts[stage.name])
            cache = patched_loaded if patched else self.unpatched
            stage_key = (stage.artifact, tuple(sorted(stage.constant_names.items())),
                         tuple(sorted((fqn, id(t)) for fqn, t in patched.items())))
            if stage_key not in cache:
                cache[stage_key] = self._load_stage(stage, patched)
            compiled[stage.name] = cache[stage_key]
        if progress is not None:
            progress("plan", len(artifacts), len(artifacts))
        if loras:
            self.variants[key] = compiled
            while len(self.variants) > self.VARIANTS:
                self.variants.popitem(last=False)
        return compiled, patch_seconds

    def original(self, stage_name: str, fqn: str) -> torch.Tensor | None:
        """Weight ``fqn`` of a stage in its original layout (what a LoRA patches), None when the
        stage's graph no longer reads it."""
        holder = self.holders[stage_name].get(fqn)
        if holder is None:
            return None
        layouts = self.relayouts[stage_name]
        stored = self.weights[self.stages[stage_name].constant_names[holder]]
        return layouts[holder].original(stored) if holder in layouts else stored

    def _load_stage(self, stage, patched: dict[str, torch.Tensor]) -> CompiledStage | OnnxStage:
        """The stage's artifact over the plan's weights, ``patched`` (initializer -> tensor) in place
        of some. An optimized ONNX graph of an fp32 plan reads the others from the plan file itself."""
        member = self.reader.member(stage.artifact)
        weights = {fqn: patched.get(fqn, self.weights[key]) for fqn, key in stage.constant_names.items()}
        if self.reader.manifest.target["backend"] == "onnx":
            in_file = stage.optimized and self.reader.manifest.weights_offset is not None
            return OnnxStage(bytes(member), patched if in_file else weights, self.providers, self.device,
                             stage.describe(), self.settings.artifact_cache,
                             plan_file=self.reader.path if in_file else None, optimized=stage.optimized,
                             prepack=self.prepack)
        artifact = cached_artifact(member, self.reader.manifest.members[stage.artifact], self.settings.artifact_cache)
        return CompiledStage(artifact, weights, self.device, stage.describe())


def _tokenizers(reader: PlanReader) -> dict[str, ClipBpe]:
    """One tokenizer per vocabulary member the plan's ``tokenize`` stages name."""
    out = {}
    for stage in reader.manifest.stages:
        member = stage.params.get("vocabulary") if stage.kind == "tokenize" else None
        if member is not None and member not in out:
            try:
                out[member] = ClipBpe(bytes(reader.member(member)))
            except ValueError as exc:
                raise PlanError("invalid_plan", f"{stage.describe()}: member {member} is not a usable "
                                f"vocabulary ({exc})") from None
    return out


def _providers(manifest: Manifest, forced: str | None) -> list[str]:
    """onnxruntime's execution providers for an ONNX plan; [] for an AOTInductor plan."""
    if manifest.target["backend"] == "onnx":
        chosen = choose_providers(manifest.target["device"], forced, onnxruntime().get_available_providers())
        if "onnx_cpu" in manifest.target and chosen[0] != CPU:
            raise PlanError("invalid_input", f"--provider {forced}: this plan's graphs were optimized for "
                            "onnxruntime's CPU provider", input_name="provider", expected="cpu",
                            found=chosen[0], hint="(compile with --device cuda for a GPU provider)")
        return chosen
    if forced is not None:
        raise PlanError("invalid_input", "--provider applies to ONNX plans only", input_name="provider",
                        expected="a plan compiled with --backend onnx", found=f"a {manifest.target['backend']} plan")
    return []


def describe_plan(path: str | Path) -> str:
    """What ``kiln inspect`` prints: target, inputs, stages, folded nodes, members and sizes.

    Reads the manifest only (no hashing, no loading), so it also works on a plan this machine
    cannot run; compatibility problems are listed instead of raised.
    """
    reader = PlanReader(path)
    m = reader.manifest
    sizes = {name: info.file_size for name, info in reader.entries.items()}
    lines = [f"plan {reader.path}: {m.format} v{m.format_version}, kiln {m.kiln_version}, torch {m.torch_version}",
             f"target: {m.target['device']} {m.target['dtype']} ({m.target['backend']}"
             + (f", opset {m.target['onnx_opset']})" if "onnx_opset" in m.target else ")")
             + (", weights stored as fp16" if m.target.get("weights") == FP16_WEIGHTS else "")]
    try:
        reader.check_compatible()
    except PlanError as problem:
        lines.append(f"cannot run here: {problem.format()}")
    lines.append(f"inputs ({len(m.inputs)}):")
    for spec in m.inputs:
        allowed = ""
        if spec.choices is not None:
            allowed = f", one of {', '.join(map(str, spec.choices[:6]))}{', ...' if len(spec.choices) > 6 else ''}"
        elif spec.min is not None or spec.max is not None:
            allowed = f", range {_num(spec.min)}..{_num(spec.max)}"
        lines.append(f"  {spec.name}: {spec.type}, default {spec.default!r}{allowed}")
    lines.append(f"stages ({len(m.stages)}):")
    for i, stage in enumerate(m.stages, 1):
        lines.append(f"  {i}. {stage.name}: {stage.kind}, node{plural(stage.node_ids)} {', '.join(stage.node_ids)}")
        reads, writes = ", ".join(stage.inputs.values()) or "-", ", ".join(stage.outputs.values()) or "-"
        lines.append(f"     reads {reads}; writes {writes}")
        kind = KINDS.get(stage.kind)
        settings = kind.describe(stage) if kind is not None else ""
        if settings:
            lines.append(f"     {settings}")
        if stage.artifact is not None:
            lines.append(f"     artifact {stage.artifact} ({_size(sizes.get(stage.artifact, 0))}), "
                         f"{len(stage.constant_names)} weight{plural(stage.constant_names)}")
    lines.append(f"folded ({len(m.folded)} node{plural(m.folded)}):")
    for entry in m.folded:
        lines.append(f"  {entry.get('node_id')} {entry.get('class_type')} -> {', '.join(entry.get('outputs', []))}")
    if m.dropped_models:
        lines.append(f"models left out (used only by folded nodes): {', '.join(m.dropped_models)}")
    lines.append(f"members ({_size(reader.path.stat().st_size)} in all):")
    lines.extend(f"  {name}: {_size(size)}" for name, size in sizes.items())
    return "\n".join(lines)


def _release(version: str) -> str:
    """``2.14.1+cu130`` -> ``2.14.1``: the local build tag (CUDA flavour) does not change the ABI."""
    return version.split("+", 1)[0]


def _num(value) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"
