"""Fused loops for the classic k-diffusion samplers: euler (ddim), euler_ancestral, heun, dpm_2,
dpm_2_ancestral, lms, ddpm, lcm. Each mirrors its eager twin in ``kiln.kernels.samplers.classic``.
"""
from __future__ import annotations

import torch

from ..noise import default_noise_sampler
from ..samplers.classic import dpm_2_midpoint, lms_coefficient
from ..samplers.common import get_ancestral_step
from .loop import Stepper

_NO_NOISE = (0.0, 0.0, 0.0)


def _noise_sampler(x, extra_args, noise_sampler):
    if noise_sampler is not None:
        return noise_sampler
    return default_noise_sampler(x, seed=(extra_args or {}).get("seed"))


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    run = Stepper(model, x, sigmas, extra_args, callback)
    for i in range(len(sigmas) - 1):
        s, sn = run.sig[i], run.sig[i + 1]
        cond, uncond = run.predict(x, s)
        out, den = run("euler", (s, sn - s, *_NO_NOISE), x=x, cond=cond, uncond=uncond, store=run.den_store)
        run.report(x, i, sigmas[i], den)
        x = out
    return x


def _ancestral_euler(run, x, i, cond, uncond, noise_sampler, eta, s_noise):
    """Euler to sigma_down plus ancestral noise, or the prediction itself when sigma_down is 0."""
    s, sn = run.sig[i], run.sig[i + 1]
    sigma_down, sigma_up = get_ancestral_step(s, sn, eta=eta)
    if sigma_down == 0:
        return run("denoised", _NO_NOISE, x=x, cond=cond, uncond=uncond, store=run.den_store)
    noise = noise_sampler(run.sigmas[i], run.sigmas[i + 1])
    return run("euler", (s, sigma_down - s, s_noise, sigma_up, 1.0), x=x, cond=cond, uncond=uncond,
               noise=noise, store=run.den_store)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    run = Stepper(model, x, sigmas, extra_args, callback)
    noise_sampler = _noise_sampler(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        cond, uncond = run.predict(x, run.sig[i])
        out, den = _ancestral_euler(run, x, i, cond, uncond, noise_sampler, eta, s_noise)
        run.report(x, i, sigmas[i], den)
        x = out
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    run = Stepper(model, x, sigmas, extra_args, callback)
    for i in range(len(sigmas) - 1):
        s, sn = run.sig[i], run.sig[i + 1]
        cond, uncond = run.predict(x, s)
        x_2, den = run("euler", (s, sn - s, *_NO_NOISE), x=x, cond=cond, uncond=uncond, store=("den",))
        run.report(x, i, sigmas[i], den)
        if sn == 0:
            x = x_2
        else:
            cond, uncond = run.predict(x_2, sn)
            x = run("heun", (s, sn, sn - s), x=x, cond=cond, uncond=uncond, x2=x_2, den1=den)[0]
    return x


def _dpm_2_step(run, x, cond, uncond, s, sigma_to, noise=None, noise_row=_NO_NOISE):
    """Midpoint step from s to sigma_to (two model calls); returns (x, first denoised or None)."""
    sigma_mid = dpm_2_midpoint(s, sigma_to)
    x_2, den = run("euler", (s, sigma_mid - s, *_NO_NOISE), x=x, cond=cond, uncond=uncond, store=run.den_store)
    cond, uncond = run.predict(x_2, sigma_mid)
    out = run("euler", (sigma_mid, sigma_to - s, *noise_row), x=x, y=x_2, cond=cond, uncond=uncond,
              noise=noise)[0]
    return out, den


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    run = Stepper(model, x, sigmas, extra_args, callback)
    for i in range(len(sigmas) - 1):
        s, sn = run.sig[i], run.sig[i + 1]
        cond, uncond = run.predict(x, s)
        if sn == 0:
            out, den = run("euler", (s, sn - s, *_NO_NOISE), x=x, cond=cond, uncond=uncond, store=run.den_store)
        else:
            out, den = _dpm_2_step(run, x, cond, uncond, s, sn)
        run.report(x, i, sigmas[i], den)
        x = out
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    run = Stepper(model, x, sigmas, extra_args, callback)
    noise_sampler = _noise_sampler(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        s, sn = run.sig[i], run.sig[i + 1]
        cond, uncond = run.predict(x, s)
        sigma_down, sigma_up = get_ancestral_step(s, sn, eta=eta)
        if sigma_down == 0:
            out, den = run("euler", (s, sigma_down - s, *_NO_NOISE), x=x, cond=cond, uncond=uncond,
                           store=run.den_store)
        else:
            # drawn after both model calls in the eager loop; the model draws nothing, so the order holds
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            out, den = _dpm_2_step(run, x, cond, uncond, s, sigma_down, noise, (s_noise, sigma_up, 1.0))
        run.report(x, i, sigmas[i], den)
        x = out
    return x


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    if not 1 <= order <= 4:
        raise ValueError(f"fused lms supports order 1-4, got {order}")
    run = Stepper(model, x, sigmas, extra_args, callback)
    sigmas_np = sigmas.detach().cpu().numpy()
    ds: list[torch.Tensor] = []   # derivatives, oldest first
    for i in range(len(sigmas) - 1):
        s, sn = run.sig[i], run.sig[i + 1]
        cond, uncond = run.predict(x, s)
        if sn == 0:
            out, den = run("denoised", _NO_NOISE, x=x, cond=cond, uncond=uncond, store=run.den_store)
        else:
            cur_order = min(i + 1, order)
            coeffs = [lms_coefficient(cur_order, sigmas_np, i, j) for j in range(cur_order)]
            coeffs += [0.0] * (order - cur_order)
            history = dict(zip(("h1", "h2", "h3"), reversed(ds[len(ds) - cur_order + 1:])))
            out, d, den = run("multistep", (s, 1.0, 1.0, *coeffs), x=x, cond=cond, uncond=uncond,
                              sequential=0, store=("d",) + run.den_store, **history)
            ds.append(d)
            del ds[:max(0, len(ds) - (order - 1))]
        run.report(x, i, sigmas[i], den)
        x = out
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    run = Stepper(model, x, sigmas, extra_args, callback)
    noise_sampler = _noise_sampler(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        s, sn = run.sig[i], run.sig[i + 1]
        cond, uncond = run.predict(x, s)
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if sn > 0 else None
        alpha_cumprod = 1 / ((s * s) + 1)
        alpha_cumprod_prev = 1 / ((sn * sn) + 1)
        alpha = alpha_cumprod / alpha_cumprod_prev
        row = (torch.sqrt(1.0 + s ** 2.0), s, (1.0 / alpha).sqrt(), 1 - alpha, (1 - alpha_cumprod).sqrt(),
               ((1 - alpha) * (1. - alpha_cumprod_prev) / (1. - alpha_cumprod)).sqrt(), 1.0, 1.0,
               torch.sqrt(1.0 + sn ** 2.0))
        out, den = run("ddpm", row, x=x, cond=cond, uncond=uncond, noise=noise, rescale=int(sn != 0),
                       store=run.den_store)
        run.report(x, i, sigmas[i], den)
        x = out
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    run = Stepper(model, x, sigmas, extra_args, callback)
    noise_sampler = _noise_sampler(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        sn = run.sig[i + 1]
        cond, uncond = run.predict(x, run.sig[i])
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if sn > 0 else None
        # eps/v noise_scaling: noise * sigma_next + denoised
        out, den = run("denoised", (sn, 1.0, 1.0), x=x, cond=cond, uncond=uncond, noise=noise,
                       store=run.den_store)
        run.report(x, i, sigmas[i], den)
        x = out
    return x
