"""ER-SDE-Solver-3 (ComfyUI ``er_sde``; Cui et al., arXiv:2309.06169), VP data-prediction form.

Works in ``lambda = sigma / alpha`` (exp of minus the half-log-SNR) with ComfyUI's default
noise scaler ``x * (exp(x**0.3) + 10)``; stages 2 and 3 add finite-difference corrections whose
integrals are 200-point Riemann sums, exactly as ComfyUI evaluates them (on the host: each step
is one ``er_sde`` kernel).
"""
from __future__ import annotations

import torch

from .stepper import Stepper

NUM_INTEGRATION_POINTS = 200.0
_NO_NOISE = (0.0, 0.0, 0.0)


def default_er_sde_noise_scaler(x: torch.Tensor) -> torch.Tensor:
    return x * ((x ** 0.3).exp() + 10.0)


def _er_sde_row(sig, er_lambdas, i, stage, s_noise, noise_scaler):
    """Host scalars of one ER-SDE step and its divided-difference denominators."""
    sigma, sigma_next = sig[i], sig[i + 1]
    er_lambda_s, er_lambda_t = er_lambdas[i], er_lambdas[i + 1]
    alpha_s = sigma / er_lambda_s
    alpha_t = sigma_next / er_lambda_t
    r = noise_scaler(er_lambda_t) / noise_scaler(er_lambda_s)
    dl1 = c_d = dl2 = c_u = 0.0
    if stage >= 2:
        dt = er_lambda_t - er_lambda_s
        lambda_step_size = -dt / NUM_INTEGRATION_POINTS
        lambda_pos = er_lambda_t + torch.arange(0, NUM_INTEGRATION_POINTS, dtype=torch.float32) * lambda_step_size
        scaled_pos = noise_scaler(lambda_pos)
        dl1 = er_lambdas[i] - er_lambdas[i - 1]
        c_d = alpha_t * (dt + torch.sum(1 / scaled_pos) * lambda_step_size * noise_scaler(er_lambda_t))
        if stage >= 3:
            dl2 = (er_lambdas[i] - er_lambdas[i - 2]) / 2
            s_u = torch.sum((lambda_pos - er_lambda_s) / scaled_pos) * lambda_step_size
            c_u = alpha_t * ((dt ** 2) / 2 + s_u * noise_scaler(er_lambda_t))
    noise_gain = (er_lambda_t ** 2 - er_lambda_s ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
    return (alpha_t / alpha_s * r, alpha_t * (1 - r), dl1, c_d, dl2, c_u, alpha_t, s_noise, noise_gain)


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                  noise_sampler=None, noise_scaler=None, max_stage=3):
    model_sampling = model.model_sampling
    run = Stepper(model, x, model_sampling.offset_first_sigma_for_snr(sigmas), extra_args, callback,
                  noise_sampler=noise_sampler)
    noise_scaler = default_er_sde_noise_scaler if noise_scaler is None else noise_scaler
    er_lambdas = model_sampling.sigma_to_half_log_snr(run.sig).neg().exp()   # sigma_t / alpha_t
    old = old_d = None
    for i, s, sn in run.steps():
        prediction = run.predict(x, s)
        stage = min(max_stage, i + 1)
        if sn == 0:
            out, den = run("denoised", _NO_NOISE, prediction, x=x, store=("den",))
        else:
            noise = run.noise(i) if s_noise > 0 else None
            row = _er_sde_row(run.sig, er_lambdas, i, stage, s_noise, noise_scaler)
            out, den, den_d = run("er_sde", row, prediction, x=x, old=old, old_d=old_d, noise=noise, stage=stage,
                                  store=("den", "den_d"))
            if den_d is not None:
                old_d = den_d
        x, old = run.done(i, x, out, den), den
    return x
