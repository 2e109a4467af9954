"""Upscale models (ESRGAN, SwinIR, ...) through spandrel, run with ComfyUI's tiling.

Loading follows ``comfy_extras/nodes_upscale_model.py: UpscaleModelLoader``; running follows
``ImageUpscaleWithModel`` + ``comfy/utils.py: tiled_scale_multidim`` (512 px tiles, 32 px
overlap, linear feathering), so seams land where ComfyUI's land and blend the same way.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import safetensors.torch
import torch
from kiln.nodes.resize import common_upscale

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

TILE = 512
OVERLAP = 32

# SwinIR checkpoints saved from DataParallel carry "module."; ComfyUI strips it only when it sees
# this key, and so do we.
_SWINIR_PARALLEL_KEY = "module.layers.0.residual_group.blocks.0.norm1.weight"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors without unpickling arbitrary objects (ComfyUI's safe_load)."""
    path = Path(path)
    if path.suffix.lower() in (".safetensors", ".sft"):
        return safetensors.torch.load_file(str(path), device="cpu")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd["state_dict"] if "state_dict" in sd else sd


def load_upscale_model(path: str | Path, device: str | torch.device = "cpu") -> ImageModelDescriptor:
    """A spandrel single-image model in eval mode; a clear ValueError for anything else."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError  # seconds to import: only on load

    sd = load_state_dict(path)
    if _SWINIR_PARALLEL_KEY in sd:
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        model = ModelLoader().load_from_state_dict(sd).eval()
    except UnsupportedModelError as error:
        raise ValueError(f"{Path(path).name}: not an upscale model architecture spandrel knows") from error
    if not isinstance(model, ImageModelDescriptor):
        raise ValueError(f"{Path(path).name}: upscale model must be a single-image model, "
                         f"found {type(model).__name__} ({model.architecture.name})")
    return model.to(device)


def upscale_image(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, *, scale: int,
                  device: torch.device | str = "cpu", tile: int = TILE, overlap: int = OVERLAP,
                  progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """NHWC [0,1] -> NHWC upscaled by ``scale``, clamped to [0,1].

    An alpha channel is split off, resized bilinearly and re-attached (the model sees RGB only).
    """
    alpha = None
    if image.shape[-1] == 4:
        image, alpha = image[..., :3], image[..., 3:4]
    pixels = image.movedim(-1, -3).to(device)
    with torch.no_grad():
        out = tiled_scale(pixels, lambda a: model(a.float()), tile=tile, overlap=overlap,
                          upscale_amount=scale, output_device=image.device, progress=progress)
    out = torch.clamp(out.movedim(-3, -1), min=0, max=1.0)
    if alpha is not None:
        alpha = common_upscale(alpha.movedim(-1, -3).to(out), out.shape[2], out.shape[1], "bilinear", "disabled")
        out = torch.cat((out, alpha.movedim(-3, -1)), dim=-1)
    return out


def tiled_steps(width: int, height: int, tile: int, overlap: int) -> int:
    """How many model calls ``tiled_scale`` makes for one image."""
    rows = 1 if height <= tile else math.ceil((height - overlap) / (tile - overlap))
    cols = 1 if width <= tile else math.ceil((width - overlap) / (tile - overlap))
    return rows * cols


def tiled_scale(samples: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor], *, tile: int,
                overlap: int, upscale_amount: int, out_channels: int = 3, output_device="cpu",
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """ComfyUI's ``tiled_scale`` for NCHW input: per image, one call if it fits in a tile, else
    overlapping tiles whose outputs are weighted by a linear edge feather and averaged.

    The accumulation order (row-major over tile positions), the feather weights
    ``(t+1)/feather`` multiplied in per axis, and the final division are ComfyUI's.
    """
    n, _, h, w = samples.shape
    out_h, out_w = round(h * upscale_amount), round(w * upscale_amount)
    output = torch.empty((n, out_channels, out_h, out_w), device=output_device)
    total, done = n * tiled_steps(w, h, tile, overlap), 0
    feather = round(overlap * upscale_amount)
    for b in range(n):
        image = samples[b:b + 1]
        if h <= tile and w <= tile:
            output[b:b + 1] = function(image).to(output_device)
            done += 1
            if progress is not None:
                progress(done, total)
            continue
        acc = torch.zeros((1, out_channels, out_h, out_w), device=output_device)
        weight = torch.zeros((1, out_channels, out_h, out_w), device=output_device)
        ys = range(0, h - overlap, tile - overlap) if h > tile else [0]
        xs = range(0, w - overlap, tile - overlap) if w > tile else [0]
        for y0, x0 in itertools.product(ys, xs):
            y = max(0, min(h - overlap, y0))
            x = max(0, min(w - overlap, x0))
            piece = function(image[:, :, y:y + min(tile, h - y), x:x + min(tile, w - x)]).to(output_device)
            mask = _feather_mask(piece, feather)
            oy, ox = round(upscale_amount * y), round(upscale_amount * x)
            ph, pw = piece.shape[-2:]
            acc[:, :, oy:oy + ph, ox:ox + pw].add_(piece * mask)
            weight[:, :, oy:oy + ph, ox:ox + pw].add_(mask)
            done += 1
            if progress is not None:
                progress(done, total)
        output[b:b + 1] = acc / weight
    return output


def _feather_mask(piece: torch.Tensor, feather: int) -> torch.Tensor:
    """Ones, ramped down linearly over ``feather`` pixels at every edge (skipped on an axis
    shorter than the ramp), corner weights being the product of both ramps."""
    mask = torch.ones_like(piece)
    for dim in (2, 3):
        size = mask.shape[dim]
        if feather >= size:
            continue
        for t in range(feather):
            a = (t + 1) / feather
            mask.narrow(dim, t, 1).mul_(a)
            mask.narrow(dim, size - 1 - t, 1).mul_(a)
    return mask
