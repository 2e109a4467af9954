"""Sampler previews (``--preview-method latent2rgb``): ComfyUI's ``Latent2RGBPreviewer``, a linear
map of the denoised latent's channels to RGB (``comfy/latent_formats.py`` factors), the first
image of the batch."""
from __future__ import annotations

import torch
from PIL import Image

# scale factor of the latent format -> (RGB factors per latent channel, bias)
_FACTORS = {
    0.18215: ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
               [-0.2120, -0.2616, -0.7177]], None),                                     # SD15 (and SD2)
    0.13025: ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
               [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),               # SDXL
}
METHODS = ("none", "latent2rgb")


def latent_preview(x0: torch.Tensor, scale_factor: float) -> Image.Image | None:
    """The preview of a sampler-space prediction, or None for a latent format without factors."""
    factors = _FACTORS.get(round(float(scale_factor), 5))
    if factors is None or x0.shape[1] != len(factors[0]):
        return None
    weight = torch.tensor(factors[0], dtype=x0.dtype, device=x0.device).transpose(0, 1)
    bias = None if factors[1] is None else torch.tensor(factors[1], dtype=x0.dtype, device=x0.device)
    rgb = torch.nn.functional.linear(x0[0].movedim(0, -1), weight, bias=bias)
    pixels = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(0xFF).to(device="cpu", dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())
