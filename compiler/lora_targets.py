"""Which plan weights a LoRA may patch when the plan loads (``kiln.runtime.lora`` reads the table).

Each UNet and text encoder a plan's stages run is a *group*, named by the loader outputs its
handles come from ("4.0": node 4's MODEL). A group records the LoRA key map of its handle
(LoRA tensor base name -> ComfyUI key, the interpreter's own ``lora_keys``) and, per ComfyUI
key, the plan weight holding it and the dtype ComfyUI stores it in (fp16 for text encoders:
a patch is rounded there once, as ComfyUI rounds it) and the stage constants (FQNs) holding it.
Weights are matched by tensor identity between the handle and the exported stage, so any
module path a stage uses is found.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.nodes.models.clip import Clip
from kiln.nodes.models.unet import DiffusionModel


@dataclass
class PatchableGroup:
    sources: list[str]                                  # "<node>.<slot>" of the handles sharing it
    kind: str                                           # "model" | "clip"
    keys: dict[str, str]                                # LoRA base name -> ComfyUI key
    weights: dict[str, tuple[torch.Tensor, torch.dtype]]   # ComfyUI key -> (tensor, stored dtype)
    folded: list[str] = field(default_factory=list)     # nodes whose encoding with it was folded


def patchable_groups(handles: dict[str, tuple], folded_clips: tuple[tuple[str, str, object], ...] = ()
                     ) -> list[PatchableGroup]:
    """One group per distinct UNet or CLIP among the compile-time handles (a handle sharing every
    weight with an earlier one, CLIPSetLastLayer's or ModelSampling's output, is that group).
    A CLIP group lists the folded nodes (``folded_clips``) that encoded with its weights: their
    outputs are plan constants a LoRA applied at load cannot change."""
    groups: dict[tuple, PatchableGroup] = {}
    for node_id, outputs in handles.items():
        for slot, handle in enumerate(outputs):
            _add(groups, f"{node_id}.{slot}", handle)
    for node_id, source, clip in folded_clips:
        used = {_identity(t) for t, _ in _group(source, clip).weights.values()}
        sharing = [g for g in groups.values()
                   if g.kind == "clip" and used & {_identity(t) for t, _ in g.weights.values()}]
        for group in sharing or [_add(groups, source, clip)]:   # else a text encoder only folded nodes used
            group.folded.append(node_id)
    return list(groups.values())


def _add(groups: dict[tuple, PatchableGroup], source: str, handle) -> PatchableGroup | None:
    group = _group(source, handle)
    if group is None:
        return None
    identity = tuple(sorted(_identity(t) for t, _ in group.weights.values()))
    if identity in groups:
        groups[identity].sources.append(source)
    else:
        groups[identity] = group
    return groups[identity]


def _group(source: str, handle) -> PatchableGroup | None:
    if isinstance(handle, DiffusionModel):
        unet, stored = handle.unet, handle.weights.stored_dtype
        return PatchableGroup([source], "model", handle.lora_keys(),
                              {key: (t, stored or t.dtype) for key, name in handle.weights.targets.items()
                               for t in [unet.get_parameter(name)]})
    if isinstance(handle, Clip):
        weights = {}
        for patched in handle.weights.values():
            module = patched.module()
            weights.update({key: (t, patched.stored_dtype or t.dtype) for key, name in patched.targets.items()
                            for t in [module.get_parameter(name)]})
        return PatchableGroup([source], "clip", handle.lora_keys(), weights)
    return None


def _identity(t: torch.Tensor) -> tuple:
    return t.device.type, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype


def lora_table(groups: list[PatchableGroup], stage_constants: dict[str, dict[str, torch.Tensor]]) -> dict | None:
    """The ``lora.json`` member: for each group with weights in the plan, its key map and
    ``targets`` (ComfyUI key -> {"dtype": stored dtype, "at": [[stage, FQN], ...]}: where stages
    use it) and ``folded`` (nodes whose encoding with it is a plan constant; a group only those
    used has no targets). ``stage_constants`` holds each compiled stage's constants (FQN -> tensor); places
    are per FQN because the plan stores equal tensors once. None when no stage holds a UNet or
    text-encoder weight (prompts folded, decode-only plans)."""
    owner = {_identity(t): (index, key) for index, group in enumerate(groups)
             for key, (t, _) in group.weights.items()}
    targets: dict[int, dict[str, dict]] = {index: {} for index, group in enumerate(groups) if group.folded}
    for stage, tensors in stage_constants.items():
        for fqn, tensor in tensors.items():
            found = owner.get(_identity(tensor))
            if found is None:
                continue
            index, key = found
            stored = str(groups[index].weights[key][1]).removeprefix("torch.")
            targets.setdefault(index, {}).setdefault(key, {"dtype": stored, "at": []})["at"].append([stage, fqn])
    if not any(targets.values()):
        return None
    return {"groups": [{"sources": groups[i].sources, "kind": groups[i].kind,
                        "keys": groups[i].keys if targets[i] else {}, "targets": targets[i],
                        "folded": groups[i].folded} for i in sorted(targets)]}
