"""LoRA-family files as weight patches, with ComfyUI's numerics (``comfy/lora.py: load_lora``,
``calculate_weight``; ``comfy/weight_adapter/{lora,loha,lokr,base}.py``; ``comfy/model_patcher.py:
patch_weight_to_device``).

A file becomes ``{target key: Adapter}`` (targets from a key map, ``nodes/models/lora_keys``). A
patched weight is the original copied to fp32, every patch of that key added in application
order (factors cast to fp32), then cast once to the dtype the weight is stored in: ComfyUI's
order, so a chain of loaders rounds once, not once per loader. Shared by the interpreter's model handles and by plans,
which patch their stored weights when they load (``kiln.runtime.lora``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

log = logging.getLogger("kiln.lora")

_UNSUPPORTED = {".oft_blocks": "OFT/BOFT", ".a1.weight": "GLoRA"}
# (up, down, mid) tensor names, the first present wins (LoRAAdapter.load).
_LORA_NAMES = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
)


class LoraFileError(ValueError):
    """A file that is no LoRA kiln can apply; the message says what was expected and found."""


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


def _tucker(wa: torch.Tensor, wb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


@dataclass(frozen=True)
class Adapter:
    """One name's patch: ``kind`` lora | loha | lokr | diff | set, its tensors, ``alpha`` and
    ``dora_scale`` as read from the file."""

    kind: str
    tensors: tuple[torch.Tensor | None, ...]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    def apply(self, weight: torch.Tensor, strength: float, key: str) -> torch.Tensor:
        """``weight`` (fp32, patched in place where ComfyUI does) with this patch at ``strength``."""
        if self.kind == "diff":
            diff = self.tensors[0]
            _check_shape(key, diff.shape, weight.shape)
            if strength != 0.0:
                weight += strength * diff.to(weight.device, weight.dtype)
            return weight
        if self.kind == "set":
            weight.copy_(self.tensors[0])
            return weight
        diff, scale = self._diff(weight.device)
        if diff.numel() != weight.numel():
            _check_shape(key, diff.shape, weight.shape)
        diff = diff.reshape(weight.shape)
        if self.dora_scale is not None:
            return _weight_decompose(self.dora_scale, weight, diff, scale, strength)
        weight += ((strength * scale) * diff).type(weight.dtype)
        return weight

    def check_fits(self, shape: Sequence[int], key: str) -> None:
        """Refuse a patch whose ΔW cannot take the weight's shape (worked out on the meta device)."""
        if self.kind in ("diff", "set"):
            _check_shape(key, self.tensors[0].shape, shape)
            return
        diff, _ = self._diff("meta")
        if diff.numel() != math.prod(shape):
            _check_shape(key, diff.shape, shape)

    def _diff(self, device) -> tuple[torch.Tensor, float]:
        """(ΔW before scaling, the alpha scale) in fp32."""
        if self.kind == "lora":
            up, down, mid = (None if t is None else _f32(t, device) for t in self.tensors)
            scale = self.alpha / down.shape[0] if self.alpha is not None else 1.0
            if mid is not None:   # LoCon's Tucker middle
                final_shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                down = torch.mm(down.transpose(0, 1).flatten(start_dim=1),
                                mid.transpose(0, 1).flatten(start_dim=1)).reshape(final_shape).transpose(0, 1)
            return torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)), scale
        if self.kind == "loha":
            w1a, w1b, w2a, w2b, t1, t2 = (None if t is None else _f32(t, device) for t in self.tensors)
            scale = self.alpha / w1b.shape[0] if self.alpha is not None else 1.0
            if t1 is not None:
                return _tucker(w1a, w1b, t1) * _tucker(w2a, w2b, t2), scale
            return torch.mm(w1a, w1b) * torch.mm(w2a, w2b), scale
        w1, w2, w1a, w1b, w2a, w2b, t2 = (None if t is None else _f32(t, device) for t in self.tensors)
        rank = None
        if w1 is None:
            rank = w1b.shape[0]
            w1 = torch.mm(w1a, w1b)
        if w2 is None:
            rank = w2b.shape[0]
            w2 = torch.mm(w2a, w2b) if t2 is None else _tucker(w2a, w2b, t2)
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        scale = self.alpha / rank if self.alpha is not None and rank is not None else 1.0
        return torch.kron(w1, w2), scale


def _check_shape(key: str, found: Sequence[int], expected: Sequence[int]) -> None:
    if tuple(found) != tuple(expected):
        raise LoraFileError(f"its patch for {key} has shape {tuple(found)} but the model's weight is "
                            f"{tuple(expected)}: the LoRA was made for another model")


def _weight_decompose(dora_scale: torch.Tensor, weight: torch.Tensor, diff: torch.Tensor, scale: float,
                      strength: float) -> torch.Tensor:
    """DoRA (``weight_decompose``): the patched weight renormalised by ``dora_scale``."""
    dora_scale = _f32(dora_scale, weight.device)
    diff = diff * scale
    calc = weight + diff.type(weight.dtype)
    if dora_scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    norm = norm + torch.finfo(weight.dtype).eps
    calc *= (dora_scale / norm).type(weight.dtype)
    if strength != 1.0:
        calc -= weight
        weight += strength * calc
    else:
        weight[:] = calc
    return weight


def _lora_adapter(x: str, sd: dict, alpha, dora, used: set[str]) -> Adapter | None:
    for up, down, mid in _LORA_NAMES:
        if x + up in sd:
            mid_tensor = sd.get(x + mid) if mid is not None else None
            used.update(n for n in (x + up, x + down, x + mid if mid_tensor is not None else None) if n)
            return Adapter("lora", (sd[x + up], sd[x + down], mid_tensor), alpha, dora)
    return None


def _loha_adapter(x: str, sd: dict, alpha, dora, used: set[str]) -> Adapter | None:
    if x + ".hada_w1_a" not in sd:
        return None
    names = [x + s for s in (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")]
    tucker = [x + ".hada_t1", x + ".hada_t2"] if x + ".hada_t1" in sd else []
    used.update(names + tucker)
    t1, t2 = (sd[tucker[0]], sd[tucker[1]]) if tucker else (None, None)
    return Adapter("loha", (*(sd[n] for n in names), t1, t2), alpha, dora)


def _lokr_adapter(x: str, sd: dict, alpha, dora, used: set[str]) -> Adapter | None:
    suffixes = (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
    tensors = tuple(sd.get(x + s) for s in suffixes)
    used.update(x + s for s in suffixes if x + s in sd)
    if all(tensors[i] is None for i in (0, 1, 2, 4)):
        return None
    return Adapter("lokr", tensors, alpha, dora)


def read_patches(sd: dict[str, torch.Tensor], key_map: dict[str, str]) -> tuple[dict[str, Adapter], list[str]]:
    """(target key -> patch, the file's names no target took: ComfyUI's "lora key not loaded")."""
    for name in sd:
        for marker, kind in _UNSUPPORTED.items():
            if name.endswith(marker):
                raise LoraFileError(f"it holds {kind} patches ({name}), which kiln does not apply")
    patches: dict[str, Adapter] = {}
    used: set[str] = set()
    for x, target in key_map.items():
        alpha = None
        if x + ".alpha" in sd:
            alpha = sd[x + ".alpha"].item()
            used.add(x + ".alpha")
        dora = sd.get(x + ".dora_scale")
        if dora is not None:
            used.add(x + ".dora_scale")
        for reader in (_lora_adapter, _loha_adapter, _lokr_adapter):   # as ComfyUI, a later kind overwrites
            adapter = reader(x, sd, alpha, dora, used)
            if adapter is not None:
                patches[target] = adapter
        bias_target = target[:-len(".weight")] + ".bias"
        if x + ".w_norm" in sd:
            used.add(x + ".w_norm")
            patches[target] = Adapter("diff", (sd[x + ".w_norm"],))
            if x + ".b_norm" in sd:
                used.add(x + ".b_norm")
                patches[bias_target] = Adapter("diff", (sd[x + ".b_norm"],))
        for suffix, key, kind in ((".diff", target, "diff"), (".diff_b", bias_target, "diff"),
                                  (".set_weight", target, "set")):
            if x + suffix in sd:
                used.add(x + suffix)
                patches[key] = Adapter(kind, (sd[x + suffix],))
    return patches, [name for name in sd if name not in used]


# A weight's patches in application order: (strength, adapter).
PatchList = tuple[tuple[float, Adapter], ...]


def patched_weight(original: torch.Tensor, patches: PatchList, key: str,
                   stored_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``original`` with ``patches`` applied in fp32, rounded once to ``stored_dtype`` (the dtype
    ComfyUI keeps the weight in; default the original's), returned in the original's dtype."""
    weight = original.to(torch.float32, copy=True)
    for strength, adapter in patches:
        weight = adapter.apply(weight, strength, key)
    stored = stored_dtype or original.dtype
    return weight.to(stored).to(original.dtype)



def file_patches(sd: dict[str, torch.Tensor], key_map: dict[str, str], what: str) -> dict[str, Adapter]:
    """The patches a LoRA file holds for the weights ``key_map`` names (names no key takes are
    logged as ComfyUI logs them); a file that patches none is refused (no LoRA, or one for
    another model than ``what``, e.g. "sd15 model and CLIP")."""
    patches, unloaded = read_patches(sd, key_map)
    if not patches:
        shown = ", ".join(list(sd)[:3]) + (", ..." if len(sd) > 3 else "")
        raise LoraFileError(f"none of its {len(sd)} tensors patches a weight of this {what} "
                            f"(found {shown}; expected LoRA names such as lora_unet_*, lora_te_*, "
                            "diffusion_model.* or diffusers' down_blocks.*)")
    for name in unloaded:
        log.warning("lora key not loaded: %s", name)
    return patches


def report_not_loaded(keys) -> None:
    """ComfyUI's warning for mapped keys that no weight of the patched models took."""
    for key in keys:
        log.warning("NOT LOADED %s", key)
