"""RES multistep samplers (ComfyUI ``res_multistep*``; Zhang et al., arXiv:2308.02157).

A second-order exponential multistep method in log-sigma time that reuses the previous
denoised estimate, with optional ancestral noise (eta) and a CFG++ flavour that steps on the
unconditional prediction.
"""
from __future__ import annotations

import torch

from kiln.kernels.noise import default_noise_sampler
from kiln.kernels.samplers.cfg_pp import with_uncond_capture
from kiln.kernels.samplers.common import get_ancestral_step, to_d


def _phi1(t):
    return torch.expm1(t) / t


def _phi2(t):
    return (_phi1(t) - 1.0) / t


def res_multistep_step(x, denoised, uncond_denoised, old_denoised, sigma, sigma_down, sigma_up,
                       old_sigma_down, sigma_prev, noise=None, s_noise=1.0, cfg_pp=False):
    """One RES step down to ``sigma_down`` plus ``noise * s_noise * sigma_up``.

    Euler on the first step and when ``sigma_down == 0``; ``uncond_denoised`` is only read with cfg_pp.
    """
    if sigma_down == 0 or old_denoised is None:
        if cfg_pp:
            x = denoised + to_d(x, sigma, uncond_denoised) * sigma_down
        else:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
    else:
        t, t_old = sigma.log().neg(), old_sigma_down.log().neg()
        t_next, t_prev = sigma_down.log().neg(), sigma_prev.log().neg()
        h = t_next - t
        c2 = (t_prev - t_old) / h
        phi1_val, phi2_val = _phi1(-h), _phi2(-h)
        b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
        b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
        if cfg_pp:
            x = x + (denoised - uncond_denoised)
            x = h.neg().exp() * x + h * (b1 * uncond_denoised + b2 * old_denoised)
        else:
            x = h.neg().exp() * x + h * (b1 * denoised + b2 * old_denoised)
    if noise is not None:
        x = x + noise * s_noise * sigma_up
    return x


@torch.no_grad()
def res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                  noise_sampler=None, eta=1.0, cfg_pp=False):
    """Shared loop of the four RES variants.

    With eta = 0 ComfyUI still draws (and multiplies by 0) one noise tensor per step; the draws are
    skipped here since they cannot change the result.
    """
    capture = None
    if cfg_pp:
        extra_args, capture = with_uncond_capture(extra_args)
    elif extra_args is None:
        extra_args = {}
    if noise_sampler is None and eta:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    old_denoised = old_sigma_down = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond_denoised = capture.uncond_denoised if cfg_pp else None
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if eta and sigmas[i + 1] > 0 else None
        sigma_prev = sigmas[i - 1] if i > 0 else None
        x = res_multistep_step(x, denoised, uncond_denoised, old_denoised, sigmas[i], sigma_down, sigma_up,
                               old_sigma_down, sigma_prev, noise, s_noise, cfg_pp)
        old_denoised = uncond_denoised if cfg_pp else denoised
        old_sigma_down = sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                         noise_sampler=None):
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler,
                         eta=0.0, cfg_pp=False)


@torch.no_grad()
def sample_res_multistep_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                                noise_sampler=None):
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler,
                         eta=0.0, cfg_pp=True)


@torch.no_grad()
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                   s_noise=1.0, noise_sampler=None):
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler,
                         eta=eta, cfg_pp=False)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                          eta=1.0, s_noise=1.0, noise_sampler=None):
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler,
                         eta=eta, cfg_pp=True)
