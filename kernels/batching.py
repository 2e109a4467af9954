"""Batch and mask shaping shared by the interpreter's guider and the plan runtime.

ComfyUI's ``comfy/utils.py`` rules (repeat_to_batch_size, resize_to_batch_size,
reshape_mask): one copy, so compiled plans can't drift from the interpreter.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def repeat_to_batch_size(tensor: torch.Tensor, batch_size: int, dim: int = 0) -> torch.Tensor:
    """Tile (or cut) ``dim`` to ``batch_size``: a 1-item cond serves every image of the batch."""
    size = tensor.shape[dim]
    if size > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if size < batch_size:
        repeats = [1] * tensor.ndim
        repeats[dim] = math.ceil(batch_size / size)
        return tensor.repeat(repeats).narrow(dim, 0, batch_size)
    return tensor


def broadcast_image_to(tensor: torch.Tensor, target_batch_size: int, batched_number: int) -> torch.Tensor:
    """A ControlNet hint for a model call batching ``batched_number`` conditioning entries
    (``comfy/controlnet.py: broadcast_image_to``): one image serves all; else the first
    per-entry share, tiled, repeated for each entry."""
    if tensor.shape[0] == 1:
        return tensor
    per_batch = target_batch_size // batched_number
    tensor = tensor[:per_batch]
    if per_batch > tensor.shape[0]:
        tensor = torch.cat([tensor] * (per_batch // tensor.shape[0]) + [tensor[:(per_batch % tensor.shape[0])]], dim=0)
    if tensor.shape[0] == target_batch_size:
        return tensor
    return torch.cat([tensor] * batched_number, dim=0)


def resize_to_batch_size(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Nearest-index resampling of the batch dim (ComfyUI's rule for inpaint images and masks)."""
    size = tensor.shape[0]
    if size == batch_size:
        return tensor
    if batch_size <= 1:
        return tensor[:batch_size]
    out = torch.empty([batch_size] + list(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    if batch_size < size:
        scale = (size - 1) / (batch_size - 1)
        for i in range(batch_size):
            out[i] = tensor[min(round(i * scale), size - 1)]
    else:
        scale = size / batch_size
        for i in range(batch_size):
            out[i] = tensor[min(math.floor((i + 0.5) * scale), size - 1)]
    return out


def prepare_mask(noise_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A LATENT ``noise_mask`` (any [..., H, W]) as the sampler's denoise mask: bilinear to the
    latent size, repeated over channels and batch (``comfy.utils.reshape_mask``)."""
    mask = noise_mask.reshape((-1, 1, noise_mask.shape[-2], noise_mask.shape[-1]))
    mask = F.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    if mask.shape[1] < shape[1]:
        mask = mask.repeat((1, shape[1], 1, 1))[:, :shape[1]]
    return repeat_to_batch_size(mask, shape[0]).float()
