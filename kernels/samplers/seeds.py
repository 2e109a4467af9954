"""SEEDS-2 / SEEDS-3 (ComfyUI ``seeds_2``/``seeds_3``; Gonzalez et al., arXiv:2305.14267).

Stochastic exponential derivative-free solvers in VP data prediction and half-log-SNR time.
The injected noise of one step is built stage by stage so that the sub-steps' Brownian
increments stay correlated (each stage decays the previous noise and adds a fresh draw).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kiln.kernels.noise import default_noise_sampler


def ei_h_phi_1(h: torch.Tensor) -> torch.Tensor:
    """h * phi_1(h) of exponential integrators."""
    return torch.expm1(h)


def ei_h_phi_2(h: torch.Tensor) -> torch.Tensor:
    """h * phi_2(h) of exponential integrators."""
    return (torch.expm1(h) - h) / h


def seeds_stage(x, sigma, sigma_target, r, h, eta, denoised_term):
    """Deterministic part of a (sub)step from ``sigma`` to ``sigma_target`` (at lambda_s + r h).

    ``denoised_term`` is the weighted data prediction ``alpha_target * sum(b_k * denoised_k)``.
    """
    return sigma_target / sigma * (-r * h * eta).exp() * x - denoised_term


def first_noise(h, r, eta, noise):
    """Noise for the first sub-step [lambda_s, lambda_s + r h]."""
    return (-2 * r * h * eta).expm1().neg().sqrt() * noise


def chained_noise(sde_noise, r_from, r_to, h, eta, noise):
    """Carry the sub-step noise from ``r_from`` to ``r_to`` and add the fresh increment."""
    segment_factor = (r_from - r_to) * h * eta
    sde_noise = sde_noise * segment_factor.exp()
    return sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise


@dataclass
class _Step:
    """One SEEDS step from ``sigma`` to ``sigma_next`` in half-log-SNR time: what the stages share."""

    sigma: torch.Tensor
    sigma_next: torch.Tensor
    lambda_s: torch.Tensor
    lambda_t: torch.Tensor
    h: torch.Tensor
    h_eta: torch.Tensor
    eta: float
    s_noise: float
    inject_noise: bool
    sigma_fn: Callable
    denoise: Callable          # (x, sigma) -> the guided prediction
    noise_sampler: Callable

    def stage_sigma(self, r):
        """The sigma at lambda_s + r h and its alpha."""
        lam = torch.lerp(self.lambda_s, self.lambda_t, r)
        sigma = self.sigma_fn(lam)
        return sigma, sigma * lam.exp()


def _seeds_loop(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, step):
    """The loop both SEEDS solvers share: the first prediction, the callback, the step to sigma 0
    returning it, ``step(x, denoised, frame) -> x`` otherwise."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    model_sampling = model.model_sampling
    sigmas = model_sampling.offset_first_sigma_for_snr(sigmas)
    lambda_fn = model_sampling.sigma_to_half_log_snr
    s_in = x.new_ones([x.shape[0]])

    def denoise(x, sigma):
        return model(x, sigma * s_in, **extra_args)

    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        x = step(x, denoised, _Step(sigmas[i], sigmas[i + 1], lambda_s, lambda_t, h, h * (eta + 1), eta, s_noise,
                                    eta > 0 and s_noise > 0, model_sampling.half_log_snr_to_sigma, denoise,
                                    noise_sampler))
    return x


@torch.no_grad()
def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r=0.5, solver_type="phi_1"):
    if solver_type not in {"phi_1", "phi_2"}:
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")
    fac = 1 / (2 * r)

    def step(x, denoised, f: _Step):
        sigma_s_1, alpha_s_1 = f.stage_sigma(r)
        alpha_t = f.sigma_next * f.lambda_t.exp()
        x_2 = seeds_stage(x, f.sigma, sigma_s_1, r, f.h, f.eta, alpha_s_1 * ei_h_phi_1(-r * f.h_eta) * denoised)
        if f.inject_noise:
            sde_noise = first_noise(f.h, r, f.eta, f.noise_sampler(f.sigma, sigma_s_1))
            x_2 = x_2 + sde_noise * sigma_s_1 * f.s_noise
        denoised_2 = f.denoise(x_2, sigma_s_1)
        if solver_type == "phi_1":
            term = alpha_t * ei_h_phi_1(-f.h_eta) * torch.lerp(denoised, denoised_2, fac)
        else:
            b2 = ei_h_phi_2(-f.h_eta) / r
            b1 = ei_h_phi_1(-f.h_eta) - b2
            term = alpha_t * (b1 * denoised + b2 * denoised_2)
        x = seeds_stage(x, f.sigma, f.sigma_next, 1.0, f.h, f.eta, term)
        if f.inject_noise:
            sde_noise = chained_noise(sde_noise, r, 1.0, f.h, f.eta, f.noise_sampler(sigma_s_1, f.sigma_next))
            x = x + sde_noise * f.sigma_next * f.s_noise
        return x

    return _seeds_loop(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, step)


@torch.no_grad()
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r_1=1.0 / 3, r_2=2.0 / 3):
    def step(x, denoised, f: _Step):
        sigma_s_1, alpha_s_1 = f.stage_sigma(r_1)
        sigma_s_2, alpha_s_2 = f.stage_sigma(r_2)
        alpha_t = f.sigma_next * f.lambda_t.exp()
        x_2 = seeds_stage(x, f.sigma, sigma_s_1, r_1, f.h, f.eta, alpha_s_1 * ei_h_phi_1(-r_1 * f.h_eta) * denoised)
        if f.inject_noise:
            sde_noise = first_noise(f.h, r_1, f.eta, f.noise_sampler(f.sigma, sigma_s_1))
            x_2 = x_2 + sde_noise * sigma_s_1 * f.s_noise
        denoised_2 = f.denoise(x_2, sigma_s_1)
        a3_2 = r_2 / r_1 * ei_h_phi_2(-r_2 * f.h_eta)
        a3_1 = ei_h_phi_1(-r_2 * f.h_eta) - a3_2
        x_3 = seeds_stage(x, f.sigma, sigma_s_2, r_2, f.h, f.eta, alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2))
        if f.inject_noise:
            sde_noise = chained_noise(sde_noise, r_1, r_2, f.h, f.eta, f.noise_sampler(sigma_s_1, sigma_s_2))
            x_3 = x_3 + sde_noise * sigma_s_2 * f.s_noise
        denoised_3 = f.denoise(x_3, sigma_s_2)
        b3 = ei_h_phi_2(-f.h_eta) / r_2
        b1 = ei_h_phi_1(-f.h_eta) - b3
        x = seeds_stage(x, f.sigma, f.sigma_next, 1.0, f.h, f.eta, alpha_t * (b1 * denoised + b3 * denoised_3))
        if f.inject_noise:
            sde_noise = chained_noise(sde_noise, r_2, 1.0, f.h, f.eta, f.noise_sampler(sigma_s_2, f.sigma_next))
            x = x + sde_noise * f.sigma_next * f.s_noise
        return x

    return _seeds_loop(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, step)
