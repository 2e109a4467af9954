"""VAE nodes: VAEDecode, VAEEncode, VAEEncodeForInpaint (``nodes.py`` + ``comfy/sd.py: VAE``).

The VaeHandle only maps pixels <-> latents; the pixel-side conventions ComfyUI applies around
that (centre crop to a multiple of the downscale ratio, dropping alpha, inpaint masking) live
here so every VAE implementation gets them identically.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.nodes.registry import INT, SOCKET, node


def crop_to_multiple(pixels: torch.Tensor, ratio: int) -> torch.Tensor:
    """Centre-crop NHWC ``pixels`` so H and W are multiples of ``ratio``; an odd leftover pixel is
    dropped at the far edge (``comfy/sd.py: VAE.vae_encode_crop_pixels``)."""
    for dim in (1, 2):
        size = pixels.shape[dim]
        kept = (size // ratio) * ratio
        if kept != size:
            pixels = pixels.narrow(dim, (size % ratio) // 2, kept)
    return pixels


@node("VAEDecode", [SOCKET("samples", "LATENT"), SOCKET("vae", "VAE")], ["IMAGE"], category="latent")
def vae_decode(samples: dict, vae):
    return (vae.decode(samples["samples"]),)


@node("VAEEncode", [SOCKET("pixels", "IMAGE"), SOCKET("vae", "VAE")], ["LATENT"], category="latent")
def vae_encode(pixels: torch.Tensor, vae):
    return ({"samples": vae.encode(crop_to_multiple(pixels[:, :, :, :3], vae.downscale_ratio))},)


@node("VAEEncodeForInpaint",
      [SOCKET("pixels", "IMAGE"), SOCKET("vae", "VAE"), SOCKET("mask", "MASK"),
       INT("grow_mask_by", 6, min=0, max=64)],
      ["LATENT"], category="latent/inpaint")
def vae_encode_for_inpaint(pixels: torch.Tensor, vae, mask: torch.Tensor, grow_mask_by: int = 6):
    """Masked pixels are set to mid-grey before encoding (so the VAE sees no content there), and
    the rounded mask, grown by ``grow_mask_by`` px, becomes the sampler's noise mask."""
    ratio = vae.downscale_ratio
    height, width = (pixels.shape[1] // ratio) * ratio, (pixels.shape[2] // ratio) * ratio
    mask = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]),
                         size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    pixels = crop_to_multiple(pixels[:, :, :, :3].clone(), ratio)
    mask = crop_to_multiple(mask.movedim(1, -1), ratio).movedim(-1, 1)

    if grow_mask_by == 0:
        grown = mask
    else:
        kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by), dtype=mask.dtype, device=mask.device)
        grown = torch.clamp(F.conv2d(mask.round(), kernel, padding=math.ceil((grow_mask_by - 1) / 2)), 0, 1)

    keep = (1.0 - mask.round()).squeeze(1).unsqueeze(-1)
    pixels -= 0.5
    pixels *= keep
    pixels += 0.5
    return ({"samples": vae.encode(pixels), "noise_mask": grown[:, :, :height, :width].round()},)
