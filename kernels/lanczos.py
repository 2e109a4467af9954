"""PIL's LANCZOS resize in exportable torch, bit for bit (ComfyUI's ``lanczos`` upscale method).

ComfyUI resizes through 8-bit PIL images. Pillow's resampler (``libImaging/Resample.c``) is a
separable filter: per output pixel, weights over a window of input pixels computed in double,
normalised, then turned into 22-bit fixed-point integers; each pass sums ``uint8 * weight``
from a rounding offset, shifts and clamps to 8 bits — horizontal pass first, then vertical, on
8-bit intermediates; an axis whose size does not change is not filtered. The weights depend
only on the sizes, so they are computed here at compile time as a matrix of integer weights
(zero outside each window); the sums are exact in float64 (below 2^53) in any order, so a
matrix product then floor reproduce Pillow. A module keeps the matrices as buffers (weights
of the compiled stage), not as constants created while tracing.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Weights = Callable[[int, int], torch.Tensor]   # (in size, out size) -> [out, in] float64

_PRECISION_BITS = 32 - 8 - 2
_SUPPORT = 3.0   # lanczos a = 3


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


def _to_fixed(weight: float) -> int:
    """``normalize_coeffs_8bpc``: round half away from zero, truncating as C's ``(int)`` does."""
    scaled = weight * (1 << _PRECISION_BITS)
    return int(-0.5 + scaled) if weight < 0 else int(0.5 + scaled)


def coefficients(in_size: int, out_size: int) -> torch.Tensor:
    """``precompute_coeffs`` for a full-image box as a float64 [out, in] matrix of the integer
    (22-bit fixed-point) weights."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _SUPPORT * filter_scale
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = [_lanczos((x + xmin - center + 0.5) / filter_scale) for x in range(xmax)]
        total = sum(ws)
        ws = [w / total for w in ws] if total != 0.0 else ws
        matrix[xx, xmin:xmin + xmax] = torch.tensor([float(_to_fixed(w)) for w in ws], dtype=torch.float64)
    return matrix


def _pass(pixels: torch.Tensor, dim: int, out_size: int, weights: Weights) -> torch.Tensor:
    """One 8-bit pass along ``dim`` of float64 pixel values 0..255 (exact integers)."""
    matrix = weights(pixels.shape[dim], out_size).to(pixels.device)
    sums = pixels.movedim(dim, -1) @ matrix.T + float(1 << (_PRECISION_BITS - 1))
    out = torch.floor(sums / float(1 << _PRECISION_BITS)).clamp(0, 255)
    return out.movedim(-1, dim)


def pil_lanczos(samples: torch.Tensor, width: int, height: int, weights: Weights = coefficients) -> torch.Tensor:
    """NCHW floats in [0, 1] (1 or 3 channels, concrete sizes) -> NCHW at (height, width), as
    ``kiln.nodes.resize.lanczos`` computes through PIL. ``weights(in_size, out_size)`` gives
    the coefficient matrices (``coefficients``, or a module's buffers of them)."""
    pixels = (samples * 255.0).clamp(0, 255).to(torch.uint8).to(torch.float64)   # np.clip + astype(uint8)
    if pixels.shape[-1] != width:
        pixels = _pass(pixels, 3, width, weights)
    if pixels.shape[-2] != height:
        pixels = _pass(pixels, 2, height, weights)
    return (pixels.to(torch.float32) / 255.0).to(samples.dtype)
