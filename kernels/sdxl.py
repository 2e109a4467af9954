"""SDXL's vector conditioning ``y``: the pooled text embedding, then sinusoidal embeddings of six
size options (``comfy/model_base.py: SDXL.encode_adm``), with the defaults ComfyUI's
``encode_model_conds`` gives them (the latent's pixel size, no crop). The interpreter's guider
and the plan runtime both build ``y`` here, so a plan can take prompts and sizes at run time.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

# Order of the embedded sizes in ``y``.
SIZE_OPTIONS = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """ComfyUI's sinusoidal embedding ``cat([cos, sin])`` (``diffusionmodules/util.py``), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def size_options(options: Mapping, latent_height: int, latent_width: int) -> dict[str, int]:
    """The six sizes for a conditioning entry's options over a latent of that size: width/height
    default to the latent's pixel size, crops to 0, targets to width/height."""
    width, height = options.get("width", latent_width * 8), options.get("height", latent_height * 8)
    return {"height": height, "width": width, "crop_h": options.get("crop_h", 0), "crop_w": options.get("crop_w", 0),
            "target_height": options.get("target_height", height), "target_width": options.get("target_width", width)}


def sdxl_vector(pooled: torch.Tensor, sizes: Mapping[str, int], embed_dim: int) -> torch.Tensor:
    """``y`` = [pooled, embedding of each size in SIZE_OPTIONS order], one row per pooled row."""
    values = torch.tensor([sizes[name] for name in SIZE_OPTIONS], dtype=torch.float32)
    flat = timestep_embedding(values, embed_dim).flatten().unsqueeze(0).repeat(pooled.shape[0], 1)
    return torch.cat((pooled.to(flat.device), flat), dim=1)
