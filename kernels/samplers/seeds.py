"""SEEDS-2 / SEEDS-3 (ComfyUI ``seeds_2``/``seeds_3``; Gonzalez et al., arXiv:2305.14267).

Stochastic exponential derivative-free solvers in VP data prediction and half-log-SNR time.
The injected noise of one step is built stage by stage so that the sub-steps' Brownian
increments stay correlated (each stage decays the previous noise and adds a fresh draw).
"""
from __future__ import annotations

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


def _setup(model, x, sigmas, extra_args, noise_sampler, eta, s_noise):
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    model_sampling = model.model_sampling
    sigmas = model_sampling.offset_first_sigma_for_snr(sigmas)
    return (extra_args, noise_sampler, model_sampling.sigma_to_half_log_snr, model_sampling.half_log_snr_to_sigma,
            sigmas, eta > 0 and s_noise > 0)


@torch.no_grad()
def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r=0.5, solver_type="phi_1"):
    if solver_type not in {"phi_1", "phi_2"}:
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")
    extra_args, noise_sampler, lambda_fn, sigma_fn, sigmas, inject_noise = _setup(
        model, x, sigmas, extra_args, noise_sampler, eta, s_noise)
    s_in = x.new_ones([x.shape[0]])
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = sigma_fn(lambda_s_1)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        x_2 = seeds_stage(x, sigmas[i], sigma_s_1, r, h, eta, alpha_s_1 * ei_h_phi_1(-r * h_eta) * denoised)
        if inject_noise:
            sde_noise = first_noise(h, r, eta, noise_sampler(sigmas[i], sigma_s_1))
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra_args)

        if solver_type == "phi_1":
            term = alpha_t * ei_h_phi_1(-h_eta) * torch.lerp(denoised, denoised_2, fac)
        else:
            b2 = ei_h_phi_2(-h_eta) / r
            b1 = ei_h_phi_1(-h_eta) - b2
            term = alpha_t * (b1 * denoised + b2 * denoised_2)
        x = seeds_stage(x, sigmas[i], sigmas[i + 1], 1.0, h, eta, term)
        if inject_noise:
            sde_noise = chained_noise(sde_noise, r, 1.0, h, eta, noise_sampler(sigma_s_1, sigmas[i + 1]))
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


@torch.no_grad()
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r_1=1.0 / 3, r_2=2.0 / 3):
    extra_args, noise_sampler, lambda_fn, sigma_fn, sigmas, inject_noise = _setup(
        model, x, sigmas, extra_args, noise_sampler, eta, s_noise)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r_1)
        lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = sigma_fn(lambda_s_1), sigma_fn(lambda_s_2)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_s_2 = sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        x_2 = seeds_stage(x, sigmas[i], sigma_s_1, r_1, h, eta, alpha_s_1 * ei_h_phi_1(-r_1 * h_eta) * denoised)
        if inject_noise:
            sde_noise = first_noise(h, r_1, eta, noise_sampler(sigmas[i], sigma_s_1))
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra_args)

        a3_2 = r_2 / r_1 * ei_h_phi_2(-r_2 * h_eta)
        a3_1 = ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = seeds_stage(x, sigmas[i], sigma_s_2, r_2, h, eta, alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2))
        if inject_noise:
            sde_noise = chained_noise(sde_noise, r_1, r_2, h, eta, noise_sampler(sigma_s_1, sigma_s_2))
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2 * s_in, **extra_args)

        b3 = ei_h_phi_2(-h_eta) / r_2
        b1 = ei_h_phi_1(-h_eta) - b3
        x = seeds_stage(x, sigmas[i], sigmas[i + 1], 1.0, h, eta, alpha_t * (b1 * denoised + b3 * denoised_3))
        if inject_noise:
            sde_noise = chained_noise(sde_noise, r_2, 1.0, h, eta, noise_sampler(sigma_s_2, sigmas[i + 1]))
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x
