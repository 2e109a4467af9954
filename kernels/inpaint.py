"""The extra input channels of inpainting UNets (``comfy/model_base.py: BaseModel.concat_cond``),
shared by the interpreter's guider and the plan runtime: [mask (1 channel), masked latent image],
or without a mask ComfyUI's "blank" image (a constant latent colour) under an all-ones mask.
"""
from __future__ import annotations

import torch

# ComfyUI's latent-space value of a black (all-zero pixel) image, per channel: the "masked image"
# an inpainting UNet sees when the latent carries no noise mask.
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def concat_cond(noise: torch.Tensor, latent_image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``c_concat`` for ``noise``'s shape from the (process_in'd) latent image and the denoise mask
    ``[B,1,h,w]`` or ``[B,C,h,w]``, both already at the noise's size and batch."""
    if mask is None:
        blank = torch.ones_like(noise)
        for c, value in enumerate(BLANK_INPAINT_LATENT):
            blank[:, c] *= value
        return torch.cat([torch.ones_like(noise)[:, :1], blank], dim=1)
    return torch.cat([mask[:, :1].round(), latent_image], dim=1)
