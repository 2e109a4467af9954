"""Small helpers shared by the k-diffusion-style samplers (ComfyUI's comfy/k_diffusion)."""
from __future__ import annotations

import torch


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Give a per-sample tensor trailing singleton dims so it broadcasts against [B, C, H, W]."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """Schedules end at sigma 0 (the fully denoised state)."""
    return torch.cat([x, x.new_zeros([1])])


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative dx/dsigma from a denoiser output."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step into a deterministic part down to ``sigma_down`` and fresh noise ``sigma_up``.

    ``eta == 0`` returns ``(sigma_to, 0.0)``: no noise at all, exactly as ComfyUI.
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up
