"""The toy denoiser the ComfyUI sampler vectors were produced with (vectors README, section 3)."""
from __future__ import annotations

import torch

from kiln.kernels.cfg import Denoiser, Prediction, skips_uncond
from kiln.kernels.model_sampling import ModelSamplingDiscrete

CHANNEL_BIAS = torch.tensor([0.1, -0.05, 0.02, 0.0]).view(1, 4, 1, 1)


class ToyDenoiser(Denoiser):
    """cond/uncond predictions of a cheap closed form at guidance ``cfg`` (the cfg == 1 shortcut
    as ComfyUI's: no uncond unless a sampler asks for it)."""

    def __init__(self, cfg: float = 2.0):
        self.cfg = cfg
        self.model_sampling = ModelSamplingDiscrete("eps")
        self.calls = 0

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, *, need_uncond: bool = False, **_) -> Prediction:
        self.calls += 1
        s = sigma.reshape(()) if sigma.numel() == 1 else sigma.view(-1, 1, 1, 1)
        uncond = (x + 0.25 * s * torch.tanh(x)) / (1 + s * s)
        cond = uncond + 0.1 * (torch.sin(torch.roll(x, shifts=1, dims=1)) + CHANNEL_BIAS) / torch.sqrt(1 + s * s)
        return Prediction(cond, None if skips_uncond(self.cfg, need_uncond) else uncond, self.cfg)
