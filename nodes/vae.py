"""VAE nodes: VAEDecode, VAEEncode, VAEEncodeForInpaint (``nodes.py`` + ``comfy/sd.py: VAE``).

The VaeHandle only maps pixels <-> latents on its device; the pixel-side conventions ComfyUI
applies around that (centre crop to a multiple of the downscale ratio, dropping alpha, inpaint
masking) live here so every VAE implementation, and the plans' compiled VAE stages, get them
identically. The nodes return their values on the CPU (ComfyUI's intermediate device).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kiln.nodes.plan import NodeModule
from kiln.nodes.registry import INT, SOCKET, PlanSpec, node


def crop_to_multiple(pixels: torch.Tensor, ratio: int) -> torch.Tensor:
    """Centre-crop NHWC ``pixels`` so H and W are multiples of ``ratio``; an odd leftover pixel is
    dropped at the far edge (``comfy/sd.py: VAE.vae_encode_crop_pixels``). Under export a
    symbolic size is cropped by a gather, which keeps the crop offset a runtime value."""
    for dim in (1, 2):
        size = pixels.shape[dim]
        if statically_known_true(size % ratio == 0):
            continue
        kept = (size // ratio) * ratio
        if isinstance(size, int):
            pixels = pixels.narrow(dim, (size % ratio) // 2, kept)
        else:
            index = torch.arange(kept, device=pixels.device) + (size % ratio) // 2
            pixels = pixels.index_select(dim, index)
    return pixels


def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAEEncode: RGB only, cropped to the VAE's multiple, encoded (on the VAE's device)."""
    return vae.encode(crop_to_multiple(pixels[:, :, :, :3], vae.downscale_ratio))


class VaeDecodeModule(NodeModule):
    def __init__(self, node, vae):
        super().__init__(node)
        self.vae = vae

    def forward(self, samples: dict) -> torch.Tensor:
        return self.vae.decode(samples["samples"])


class VaeEncodeModule(NodeModule):
    def __init__(self, node, vae):
        super().__init__(node)
        self.vae = vae

    def forward(self, pixels: torch.Tensor) -> dict:
        return {"samples": encode_pixels(self.vae, pixels)}


@node("VAEDecode", [SOCKET("samples", "LATENT"), SOCKET("vae", "VAE")], ["IMAGE"], category="latent",
      plan=PlanSpec("module", computes=("value",), lower=lambda node, w: VaeDecodeModule(node, w["vae"])),
      display_name="VAE Decode")
def vae_decode(samples: dict, vae):
    return (vae.decode(samples["samples"]).cpu(),)


@node("VAEEncode", [SOCKET("pixels", "IMAGE"), SOCKET("vae", "VAE")], ["LATENT"], category="latent",
      plan=PlanSpec("module", computes=("samples",), lower=lambda node, w: VaeEncodeModule(node, w["vae"])),
      display_name="VAE Encode")
def vae_encode(pixels: torch.Tensor, vae):
    return ({"samples": encode_pixels(vae, pixels).cpu()},)


@node("VAEEncodeForInpaint",
      [SOCKET("pixels", "IMAGE"), SOCKET("vae", "VAE"), SOCKET("mask", "MASK"),
       INT("grow_mask_by", 6, min=0, max=64)],
      ["LATENT"], category="latent/inpaint", display_name="VAE Encode (for Inpainting)")
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
    return ({"samples": vae.encode(pixels).cpu(), "noise_mask": grown[:, :, :height, :width].round()},)
