"""Discrete-time model sampling (sigma table, timestep lookup, eps/v parameterisation).

Mirrors ComfyUI's ``comfy/model_sampling.py`` (``ModelSamplingDiscrete`` + ``EPS`` /
``V_PREDICTION``) bit for bit: the beta schedule is built in float64 and stored as float32,
the UNet timestep is the *nearest* discrete index (no interpolation), and ``sigma(t)``
interpolates ``log_sigmas`` linearly.  Samplers and schedules only see this object.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

Prediction = Literal["eps", "v"]


def _reshape_sigma(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sigma per batch item as [B,1,1,...] (ComfyUI makes a one-element sigma a scalar view: the
    same numbers by broadcasting; deciding by rank keeps export free of a guard on the batch size)."""
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


def nearest_timestep(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The discrete timestep whose log sigma is nearest (as the sigma's shape, int64)."""
    dists = sigma.log().to(log_sigmas.device) - log_sigmas[:, None]
    return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)


class ModelSamplingDiscrete:
    """The 1000-step linear-beta schedule SD1.x, SD2.x and SDXL share."""

    sigma_data = 1.0

    def __init__(self, prediction: Prediction = "eps", linear_start: float = 0.00085,
                 linear_end: float = 0.012, timesteps: int = 1000):
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction type {prediction!r}")
        self.prediction = prediction
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas64 = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas64.float()
        self.log_sigmas = sigmas64.log().float()

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest discrete timestep (as the sigma's shape, int64)."""
        return nearest_timestep(sigma, self.log_sigmas)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low_idx = t.floor().long()
        high_idx = t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        percent = 1.0 - percent
        return self.sigma(torch.tensor(percent * 999.0)).item()

    # --- parameterisation (EPS / V_PREDICTION) -------------------------------------------
    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        sigma = _reshape_sigma(sigma, noise)
        return noise / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        sigma = _reshape_sigma(sigma, model_output)
        if self.prediction == "eps":
            return model_input - model_output * sigma
        sd = self.sigma_data
        return (model_input * sd ** 2 / (sigma ** 2 + sd ** 2)
                - model_output * sigma * sd / (sigma ** 2 + sd ** 2) ** 0.5)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        sigma = _reshape_sigma(sigma, noise)
        if max_denoise:
            noise = noise * torch.sqrt(1.0 + sigma ** 2.0)
        else:
            noise = noise * sigma
        return noise + latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return latent

    # --- helpers the SDE-family samplers use ---------------------------------------------
    @staticmethod
    def sigma_to_half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log().neg()

    @staticmethod
    def half_log_snr_to_sigma(half_log_snr: torch.Tensor) -> torch.Tensor:
        return half_log_snr.neg().exp()

    @staticmethod
    def offset_first_sigma_for_snr(sigmas: torch.Tensor, percent_offset: float = 1e-4) -> torch.Tensor:
        return sigmas

    def is_max_denoise(self, sigmas: torch.Tensor) -> bool:
        """ComfyUI's ``Sampler.max_denoise``: does the schedule start at (or above) sigma_max?"""
        max_sigma = float(self.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


class LatentFormat:
    """Scale between raw VAE latents (what flows between nodes) and sampler space."""

    def __init__(self, name: str, scale_factor: float, channels: int = 4):
        self.name = name
        self.scale_factor = scale_factor
        self.channels = channels

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.scale_factor

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale_factor


SD15_LATENT = LatentFormat("SD15", 0.18215)
SDXL_LATENT = LatentFormat("SDXL", 0.13025)
