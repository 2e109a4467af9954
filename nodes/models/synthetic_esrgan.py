"""Tiny random-weight Real-ESRGAN (RRDBNet) checkpoints for tests and benchmarks.

The keys and shapes are Real-ESRGAN's (``conv_first``, ``body.N.rdbK.convJ``, ``conv_body``,
``conv_up1/2``, ``conv_hr``, ``conv_last``; growth channels 32) so spandrel detects and loads
them like a downloaded RealESRGAN_x4plus / x2plus. Scale 2 uses x2plus's layout: a 2x pixel
unshuffle in front (12 input channels) and the same two 2x upsampling convs.
"""
from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

GROWTH_CHANNELS = 32   # spandrel's RRDBNet hard-codes gc=32


def esrgan_state_dict(*, scale: int = 4, num_feat: int = 16, num_block: int = 1,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights drawn from ``seed``, scaled down (as Real-ESRGAN's init does) so activations stay
    tame; ``conv_last`` is biased to 0.5 so outputs mostly sit inside [0, 1] rather than clamped."""
    if scale not in (2, 4):
        raise ValueError(f"scale must be 2 or 4, got {scale}")
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, c_in: int, c_out: int, gain: float = 0.1) -> None:
        std = gain * (2.0 / (c_in * 9)) ** 0.5
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen) * std
        sd[f"{name}.bias"] = torch.randn(c_out, generator=gen) * 0.01

    conv("conv_first", 3 * (4 if scale == 2 else 1), num_feat, gain=1.0)
    for b in range(num_block):
        for r in (1, 2, 3):
            for j in range(1, 5):
                conv(f"body.{b}.rdb{r}.conv{j}", num_feat + (j - 1) * GROWTH_CHANNELS, GROWTH_CHANNELS)
            conv(f"body.{b}.rdb{r}.conv5", num_feat + 4 * GROWTH_CHANNELS, num_feat)
    conv("conv_body", num_feat, num_feat)
    conv("conv_up1", num_feat, num_feat, gain=1.0)
    conv("conv_up2", num_feat, num_feat, gain=1.0)
    conv("conv_hr", num_feat, num_feat, gain=1.0)
    conv("conv_last", num_feat, 3, gain=0.2)
    sd["conv_last.bias"] = torch.full((3,), 0.5)
    return sd


def write_esrgan(path: str | Path, *, scale: int = 4, num_feat: int = 16, num_block: int = 1,
                 seed: int = 0) -> Path:
    """Write the checkpoint as safetensors (``.safetensors``/``.sft``) or a plain tensor dict
    that ``torch.load(weights_only=True)`` reads (any other suffix, e.g. ``.pth``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = esrgan_state_dict(scale=scale, num_feat=num_feat, num_block=num_block, seed=seed)
    if path.suffix.lower() in (".safetensors", ".sft"):
        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path
