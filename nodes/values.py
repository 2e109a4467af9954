"""The values that flow along ComfyUI's typed sockets, and the model handles behind them.

Socket type -> Python value (ComfyUI's own conventions, kept so parity is easy to reason about):

- CONDITIONING: ``list[tuple[Tensor[B,T,C], dict]]``; the dict holds ``pooled_output``,
  ``area``/``strength``/``set_area_to_bounds``, SDXL ``width``/``height``/``crop_w``/...
- LATENT: ``dict`` with ``samples`` (raw VAE units, [B,4,h,w]) and optional ``batch_index``
  (list[int]) and ``noise_mask`` ([B,1,H,W] or [H,W] float in [0,1]).
- IMAGE: float32 ``Tensor[B,H,W,C]`` in [0,1]; MASK: float32 ``Tensor[B,H,W]`` in [0,1].
- MODEL / CLIP / VAE / UPSCALE_MODEL: the handles below; CONTROL_NET: ``models.controlnet.ControlNet``;
  a conditioning entry's ``control``: ``models.controlnet.Control``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from kiln.kernels.model_sampling import LatentFormat, ModelSamplingDiscrete


@runtime_checkable
class DiffusionModelHandle(Protocol):
    """MODEL: a denoising UNet with its parameterisation."""

    arch: str                      # "sd1" | "sd2" | "sdxl"
    model_sampling: ModelSamplingDiscrete
    latent_format: LatentFormat
    in_channels: int               # 4, or 9 for inpainting UNets
    dtype: torch.dtype
    device: torch.device

    def apply_model(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                    y: torch.Tensor | None = None, c_concat: torch.Tensor | None = None,
                    control: dict | None = None, cond_or_uncond: tuple[int, ...] = (1, 0)) -> torch.Tensor:
        """Denoised prediction (float32, x's shape) as ComfyUI's ``BaseModel.apply_model``."""

    def encode_adm(self, pooled_output: torch.Tensor | None, *, width: int, height: int,
                   crop_w: int, crop_h: int, target_width: int, target_height: int) -> torch.Tensor | None:
        """SDXL's ``y`` vector (pooled text + size embeddings); None for SD1/SD2."""


@runtime_checkable
class ClipHandle(Protocol):
    """CLIP: tokenizer(s) + text encoder(s)."""

    def tokenize(self, text: str) -> dict: ...

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False): ...

    def clip_layer(self, layer_idx: int) -> "ClipHandle":
        """A copy that stops at ``layer_idx`` (negative, as CLIPSetLastLayer)."""


@runtime_checkable
class VaeHandle(Protocol):
    """VAE: pixel <-> latent, with ComfyUI's crops and clamps."""

    downscale_ratio: int
    latent_channels: int

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """NHWC [0,1] (already cropped to a multiple of 8) -> raw latent (posterior mean), on the VAE's device."""

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Raw latent -> NHWC image clamped to [0,1], on the VAE's device."""
