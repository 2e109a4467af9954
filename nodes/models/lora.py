"""LoRA files applied to MODEL and CLIP handles as ``comfy/sd.py: load_lora_for_models`` does
(the patch math is ``kiln.kernels.lora``)."""
from __future__ import annotations

import torch

from kiln.kernels.lora import file_patches, report_not_loaded


def load_lora_for_models(sd: dict[str, torch.Tensor], model, clip, strength_model: float, strength_clip: float):
    """(MODEL, CLIP) with the file's patches added, as ``comfy/sd.py: load_lora_for_models``:
    one key map over both models, names no weight takes logged as ComfyUI logs them. A file
    that patches nothing of either is refused: it is no LoRA, or one for another model."""
    key_map: dict[str, str] = {}
    if model is not None:
        key_map.update(model.lora_keys())
    if clip is not None:
        key_map.update(clip.lora_keys())
    patches = file_patches(sd, key_map, _what(model, clip))
    taken: set[str] = set()
    if model is not None:
        model, took = model.with_weight_patches(patches, strength_model)
        taken |= took
    if clip is not None:
        clip, took = clip.with_weight_patches(patches, strength_clip)
        taken |= took
    report_not_loaded(key for key in patches if key not in taken)
    return model, clip


def _what(model, clip) -> str:
    arch = getattr(model, "arch", None) or getattr(clip, "arch", None) or ""
    parts = [p for p, present in (("model", model is not None), ("CLIP", clip is not None)) if present]
    return f"{arch} {' and '.join(parts)}".strip()
