"""LoRAs applied to a plan's weights as it loads: no recompilation, ComfyUI's numerics.

The compiler records which plan weights a LoRA may patch (member ``lora.json``, written by
``kiln.compiler.lora_targets``): per UNet or text encoder (a *group*), its LoRA key map
and, per ComfyUI key, the stage constants holding it and the dtype ComfyUI stores it in. Loading with
``LoraSpec``s reads each file with the same patch code as the interpreter's LoraLoader
(``kiln.kernels.lora``): one key map over the groups a LoRA patches, then per weight every
LoRA's patch in the order given, in fp32, rounded once to the stored dtype -- what a chain of
LoraLoaders after the plan's own (compile-time) LoRAs computes in ComfyUI.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from kiln.kernels.lora import Adapter, LoraFileError, file_patches, patched_weight, report_not_loaded
from kiln.runtime.errors import PlanError

LORA_MEMBER = "lora.json"
# Tensor names of text-encoder LoRAs (ComfyUI's ``model_lora_keys_clip`` prefixes).
_CLIP_LORA_PREFIXES = ("lora_te", "text_encoder", "lora_prior_te")
_SAFETENSORS = (".safetensors", ".sft")
_TORCH = (".ckpt", ".pt", ".pth", ".bin")
_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)"
_SPEC = re.compile(rf"^(?P<path>.+?)(?::(?P<model>{_NUMBER}))?(?::(?P<clip>{_NUMBER}))?$")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and its strengths (``LoraLoader``'s strength_model / strength_clip); ``groups``
    limits it to those group sources (None: every UNet and text encoder of the plan)."""

    path: Path
    strength_model: float = 1.0
    strength_clip: float = 1.0
    groups: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``FILE[:STRENGTH[:CLIP_STRENGTH]]`` (the CLIP strength defaults to the model's)."""
        match = _SPEC.match(text.strip())
        if match is None or not match["path"]:
            raise PlanError("invalid_lora", "--lora takes FILE[:STRENGTH[:CLIP_STRENGTH]]", input_name="--lora",
                            expected="e.g. style.safetensors:0.8 or style.safetensors:0.8:0.5", found=repr(text))
        model = float(match["model"]) if match["model"] else 1.0
        return cls(Path(match["path"]), model, float(match["clip"]) if match["clip"] else model)

    def identity(self) -> tuple:
        """What makes two applications the same: the file as it is on disk now, and the strengths."""
        try:
            stat = self.path.stat()
            on_disk = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            on_disk = None
        return str(self.path), on_disk, self.strength_model, self.strength_clip, self.groups

    def describe(self) -> str:
        return f"{self.path.name}:{self.strength_model:g}:{self.strength_clip:g}"


def lora_overrides(original: Callable[[str, str], torch.Tensor | None], table: dict | None,
                   loras: Sequence[LoraSpec]) -> dict[str, dict[str, torch.Tensor]]:
    """Stage -> FQN -> patched tensor for the stage constants the LoRAs change. ``original(stage,
    FQN)``: the weight as the stage holds it, in its original layout (None where the stage's graph
    no longer reads it); equal tensors share a key in the plan, so patches go to FQNs, never to
    shared keys. Each patched weight is computed once."""
    if not loras:
        return {}
    if table is None:
        raise PlanError("invalid_lora", "this plan holds no UNet or text-encoder weights to patch (its models "
                        "were folded at compile time)", input_name="--lora",
                        expected="a plan with a sampler", found=", ".join(spec.describe() for spec in loras))
    pending: dict[tuple[int, str], list[tuple[float, Adapter]]] = {}
    for spec in loras:
        groups = [(i, g) for i, g in enumerate(table["groups"])
                  if spec.groups is None or set(g["sources"]) & set(spec.groups)]
        sd = read_lora_file(spec.path)
        _check_clip_kept(spec, [g for _, g in groups], sd)
        if spec.strength_clip == 0 and not any(g["kind"] == "clip" and g["targets"] for _, g in groups):
            # a text-encoder part at strength 0 changes nothing; ComfyUI adds it silently
            sd = {name: t for name, t in sd.items() if not name.startswith(_CLIP_LORA_PREFIXES)}
            if not sd:
                continue
        key_map = {name: key for _, group in groups for name, key in group["keys"].items()}
        what = " and ".join(sorted({g["kind"] for _, g in groups})) + " weights of this plan"
        try:
            patches = file_patches(sd, key_map, what)
        except LoraFileError as error:
            raise PlanError("invalid_lora", f"{spec.path.name} is no LoRA for this plan: {error}",
                            input_name="--lora", found=str(spec.path)) from None
        taken: set[str] = set()
        for index, group in groups:
            strength = spec.strength_model if group["kind"] == "model" else spec.strength_clip
            for key in patches.keys() & group["targets"].keys():
                weight = _held(original, group["targets"][key]["at"])
                if weight is not None:
                    _check_fits(spec, patches[key], weight.shape, key)
                    pending.setdefault((index, key), []).append((strength, patches[key]))
                taken.add(key)
        report_not_loaded(sorted(patches.keys() - taken))
    overrides: dict[str, dict[str, torch.Tensor]] = {}
    for (index, key), patch_list in pending.items():
        target = table["groups"][index]["targets"][key]
        tensor = patched_weight(_held(original, target["at"]), tuple(patch_list), key, getattr(torch, target["dtype"]))
        for stage, fqn in target["at"]:
            overrides.setdefault(stage, {})[fqn] = tensor
    return overrides


def _held(original: Callable[[str, str], torch.Tensor | None], places: list) -> torch.Tensor | None:
    """The weight at the first of its places (stage, FQN) whose stage still reads it."""
    return next((weight for stage, fqn in places if (weight := original(stage, fqn)) is not None), None)


def read_table(data: bytes | memoryview) -> dict:
    try:
        return json.loads(bytes(data))
    except ValueError as exc:
        raise PlanError("invalid_plan", f"member {LORA_MEMBER} is not JSON ({exc})") from None


def read_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (safetensors, or a torch file read with ``weights_only``)."""
    if not path.is_file():
        raise PlanError("missing_lora", "no LoRA file at this path", input_name="--lora",
                        expected="an existing .safetensors (or .ckpt/.pt) file", found=str(path))
    suffix = path.suffix.lower()
    try:
        if suffix in _SAFETENSORS:
            import safetensors.torch

            return safetensors.torch.load_file(str(path), device="cpu")
        if suffix in _TORCH:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
            if isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()):
                return sd
            raise ValueError("it holds no flat name -> tensor mapping")
    except Exception as exc:  # safetensors header errors, unpickling refusals, zip corruption
        raise PlanError("invalid_lora", f"{path.name} is not a readable LoRA file ({str(exc).splitlines()[0]})",
                        input_name="--lora", found=str(path)) from None
    raise PlanError("invalid_lora", "unknown LoRA file type", input_name="--lora",
                    expected=", ".join(_SAFETENSORS + _TORCH), found=path.name)


def _check_clip_kept(spec: LoraSpec, groups: list[dict], sd: dict) -> None:
    """A text-encoder LoRA at a non-zero strength needs every prompt encoded at run time: a
    prompt the compiler encoded (a plan constant) would silently keep the unpatched encoder."""
    if spec.strength_clip == 0 or not any(name.startswith(_CLIP_LORA_PREFIXES) for name in sd):
        return
    folded = sorted({node for g in groups if g["kind"] == "clip" for node in g["folded"]}, key=lambda n: (len(n), n))
    if not folded:
        return
    where = f"the prompts of node(s) {', '.join(folded)} were"
    inputs = " ".join(f"--input {node}.text" for node in folded)
    raise PlanError("invalid_lora", f"{spec.path.name} patches the text encoder, but {where} encoded at compile "
                    "time", input_name="--lora",
                    expected=f"a CLIP strength of 0 (FILE:STRENGTH:0), or a plan compiled with {inputs} so "
                    "those prompts are encoded at run time", found=spec.describe())


def _check_fits(spec: LoraSpec, adapter: Adapter, shape, key: str) -> None:
    try:
        adapter.check_fits(shape, key)
    except ValueError as error:
        raise PlanError("invalid_lora", f"{spec.path.name} does not fit this plan's model ({error})",
                        input_name="--lora", expected=f"a LoRA for weights of shape {list(shape)} at {key}",
                        found=spec.describe()) from None
