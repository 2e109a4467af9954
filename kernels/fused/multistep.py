"""Fused loops for the linear multistep samplers ipndm, ipndm_v, deis and for er_sde.

Mirrors ``kiln.kernels.samplers.multistep`` / ``er_sde``: the derivative history (newest last)
is kept as the tensors the kernels store, the weights are the eager code's host values.
"""
from __future__ import annotations

import torch

from ..noise import default_noise_sampler
from ..samplers.er_sde import NUM_INTEGRATION_POINTS, default_er_sde_noise_scaler
from ..samplers.multistep import deis_coefficients, ipndm_v_coefficients
from .loop import Stepper

_NO_NOISE = (0.0, 0.0, 0.0)
# iPNDM's equal-step Adams-Bashforth weights (newest first) and divisors per order.
_IPNDM = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


def _history(history: list, count: int) -> dict:
    """The newest ``count`` stored derivatives as the kernel's h1 (newest), h2, h3."""
    return dict(zip(("h1", "h2", "h3"), reversed(history[len(history) - count:])))


def _multistep_loop(model, x, sigmas, extra_args, callback, max_order, plan):
    """Shared loop; ``plan(i, order)`` gives (row, history count, sequential) or None for x = denoised."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"fused multistep samplers support orders 1-4, got {max_order}")
    run = Stepper(model, x, sigmas, extra_args, callback)
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        cond, uncond = run.predict(x, run.sig[i])
        step = plan(run.sig, i, min(max_order, i + 1))
        if step is None:
            out, den = run("denoised", _NO_NOISE, x=x, cond=cond, uncond=uncond, store=run.den_store)
        else:
            row, count, sequential = step
            row = tuple(row) + (0.0,) * (7 - len(row))
            out, d, den = run("multistep", row, x=x, cond=cond, uncond=uncond, sequential=sequential,
                              store=("d",) + run.den_store, **_history(history, count))
            history.append(d)
            del history[:max(0, len(history) - (max_order - 1))]
        run.report(x, i, sigmas[i], den)
        x = out
    return x


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    def plan(sig, i, order):
        if sig[i + 1] == 0:
            return None
        weights, div = _IPNDM[order]
        return (sig[i], sig[i + 1] - sig[i], div, *weights), order - 1, 0
    return _multistep_loop(model, x, sigmas, extra_args, callback, max_order, plan)


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    def plan(sig, i, order):
        if sig[i + 1] == 0:
            return None
        window = sig[i + 1 - order:i + 2]
        weights = (1.0,) if order == 1 else ipndm_v_coefficients(window, order)
        return (sig[i], window[-1] - window[-2], 1.0, *weights), order - 1, 0
    return _multistep_loop(model, x, sigmas, extra_args, callback, max_order, plan)


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3):
    coeff_list = deis_coefficients(sigmas, max_order)

    def plan(sig, i, order):
        coeffs = [] if sig[i + 1] <= 0 else coeff_list[i]
        if not coeffs:   # Euler
            return (sig[i], sig[i + 1] - sig[i], 1.0, 1.0), 0, 0
        return (sig[i], 1.0, 1.0, *coeffs), len(coeffs) - 1, 1
    return _multistep_loop(model, x, sigmas, extra_args, callback, max_order, plan)


def _er_sde_row(sig, er_lambdas, i, stage, s_noise, noise_scaler):
    """Host scalars of one ER-SDE step (eager ``er_sde_step`` and its divided-difference denominators)."""
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
    run = Stepper(model, x, sigmas, extra_args, callback)
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=(extra_args or {}).get("seed"))
    noise_scaler = default_er_sde_noise_scaler if noise_scaler is None else noise_scaler
    model_sampling = model.model_sampling
    run.sigmas = model_sampling.offset_first_sigma_for_snr(run.sigmas)
    run.sig = model_sampling.offset_first_sigma_for_snr(run.sig)
    er_lambdas = model_sampling.sigma_to_half_log_snr(run.sig).neg().exp()   # sigma_t / alpha_t
    old = old_d = None
    for i in range(len(sigmas) - 1):
        cond, uncond = run.predict(x, run.sig[i])
        stage = min(max_stage, i + 1)
        if run.sig[i + 1] == 0:
            out, den = run("denoised", _NO_NOISE, x=x, cond=cond, uncond=uncond, store=("den",))
        else:
            noise = noise_sampler(run.sigmas[i], run.sigmas[i + 1]) if s_noise > 0 else None
            row = _er_sde_row(run.sig, er_lambdas, i, stage, s_noise, noise_scaler)
            out, den, den_d = run("er_sde", row, x=x, cond=cond, uncond=uncond, old=old, old_d=old_d, noise=noise,
                                  stage=stage, store=("den", "den_d"))
            if den_d is not None:
                old_d = den_d
        run.report(x, i, run.sigmas[i], den)
        x, old = out, den
    return x
