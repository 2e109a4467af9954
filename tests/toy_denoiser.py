"""The toy denoiser the ComfyUI sampler vectors were produced with (vectors README, section 3)."""
from __future__ import annotations

import torch

from kiln.kernels.cfg import cfg_function
from kiln.kernels.model_sampling import ModelSamplingDiscrete

CHANNEL_BIAS = torch.tensor([0.1, -0.05, 0.02, 0.0]).view(1, 4, 1, 1)


class ToyDenoiser:
    """``model(x, sigma, **extra_args)`` -> CFG-combined denoised, via kiln's ``cfg_function``."""

    def __init__(self, cfg: float = 2.0):
        self.cfg = cfg
        self.model_sampling = ModelSamplingDiscrete("eps")
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, model_options=None, seed=None, **_):
        self.calls += 1
        s = sigma.reshape(()) if sigma.numel() == 1 else sigma.view(-1, 1, 1, 1)
        uncond = (x + 0.25 * s * torch.tanh(x)) / (1 + s * s)
        cond = uncond + 0.1 * (torch.sin(torch.roll(x, shifts=1, dims=1)) + CHANNEL_BIAS) / torch.sqrt(1 + s * s)
        return cfg_function(cond, uncond, self.cfg, x, sigma, model_options or {})
