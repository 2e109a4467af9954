"""ER-SDE-Solver-3 (ComfyUI ``er_sde``; Cui et al., arXiv:2309.06169), VP data-prediction form.

Works in ``lambda = sigma / alpha`` (exp of minus the half-log-SNR) with ComfyUI's default
noise scaler ``x * (exp(x**0.3) + 10)``; stages 2 and 3 add finite-difference corrections whose
integrals are 200-point Riemann sums, exactly as ComfyUI evaluates them.
"""
from __future__ import annotations

import torch

from kiln.kernels.noise import default_noise_sampler

NUM_INTEGRATION_POINTS = 200.0


def default_er_sde_noise_scaler(x: torch.Tensor) -> torch.Tensor:
    return x * ((x ** 0.3).exp() + 10.0)


def er_sde_step(x, denoised, denoised_d, denoised_u, sigma, sigma_next, er_lambda_s, er_lambda_t,
                noise=None, s_noise=1.0, noise_scaler=default_er_sde_noise_scaler):
    """One ER-SDE step; ``denoised_d``/``denoised_u`` (first/second divided differences) or None.

    Returns the new x; stage 2 needs ``denoised_d``, stage 3 also ``denoised_u``.
    """
    alpha_s = sigma / er_lambda_s
    alpha_t = sigma_next / er_lambda_t
    r_alpha = alpha_t / alpha_s
    r = noise_scaler(er_lambda_t) / noise_scaler(er_lambda_s)
    x = r_alpha * r * x + alpha_t * (1 - r) * denoised
    if denoised_d is not None:
        dt = er_lambda_t - er_lambda_s
        lambda_step_size = -dt / NUM_INTEGRATION_POINTS
        point_indice = torch.arange(0, NUM_INTEGRATION_POINTS, dtype=torch.float32, device=x.device)
        lambda_pos = er_lambda_t + point_indice * lambda_step_size
        scaled_pos = noise_scaler(lambda_pos)
        s = torch.sum(1 / scaled_pos) * lambda_step_size
        x = x + alpha_t * (dt + s * noise_scaler(er_lambda_t)) * denoised_d
        if denoised_u is not None:
            s_u = torch.sum((lambda_pos - er_lambda_s) / scaled_pos) * lambda_step_size
            x = x + alpha_t * ((dt ** 2) / 2 + s_u * noise_scaler(er_lambda_t)) * denoised_u
    if noise is not None:
        x = x + alpha_t * noise * s_noise * (er_lambda_t ** 2 - er_lambda_s ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
    return x


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                  noise_sampler=None, noise_scaler=None, max_stage=3):
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    noise_scaler = default_er_sde_noise_scaler if noise_scaler is None else noise_scaler
    model_sampling = model.model_sampling
    s_in = x.new_ones([x.shape[0]])
    sigmas = model_sampling.offset_first_sigma_for_snr(sigmas)
    er_lambdas = model_sampling.sigma_to_half_log_snr(sigmas).neg().exp()  # sigma_t / alpha_t
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        stage_used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            denoised_d = denoised_u = None
            if stage_used >= 2:
                denoised_d = (denoised - old_denoised) / (er_lambdas[i] - er_lambdas[i - 1])
                if stage_used >= 3:
                    denoised_u = (denoised_d - old_denoised_d) / ((er_lambdas[i] - er_lambdas[i - 2]) / 2)
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) if s_noise > 0 else None
            x = er_sde_step(x, denoised, denoised_d, denoised_u, sigmas[i], sigmas[i + 1], er_lambdas[i],
                            er_lambdas[i + 1], noise, s_noise, noise_scaler)
            if denoised_d is not None:
                old_denoised_d = denoised_d
        old_denoised = denoised
    return x
