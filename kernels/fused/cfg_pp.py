"""Fused loops for the samplers that step on the unconditional prediction (CFG++) and RES multistep:
euler_cfg_pp, euler_ancestral_cfg_pp, dpmpp_2s_ancestral_cfg_pp, dpmpp_2m_cfg_pp and the four
res_multistep variants. They mirror ``kiln.kernels.samplers.cfg_pp`` / ``res_multistep``; the
kernels read ``uncond`` directly, so no post-CFG hook is needed.
"""
from __future__ import annotations

import torch

from ..noise import default_noise_sampler
from ..samplers.common import get_ancestral_step
from .loop import Stepper

_NO_NOISE = (0.0, 0.0, 0.0)


def _seeded(x, extra_args):
    return default_noise_sampler(x, seed=(extra_args or {}).get("seed"))


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                  eta=1.0, s_noise=1.0, noise_sampler=None):
    run = Stepper(model, x, sigmas, extra_args, callback, need_uncond=True)
    inject = eta > 0 and s_noise > 0
    if noise_sampler is None and inject:
        noise_sampler = _seeded(x, extra_args)
    lam = model.model_sampling.sigma_to_half_log_snr
    for i in range(len(sigmas) - 1):
        s, sn = run.sig[i], run.sig[i + 1]
        cond, uncond = run.predict(x, s)
        if sn == 0:
            out, den = run("denoised", _NO_NOISE, x=x, cond=cond, uncond=uncond, store=run.den_store)
        else:
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) if inject else None
            alpha_s, alpha_t = s * lam(s).exp(), sn * lam(sn).exp()
            sigma_down, sigma_up = get_ancestral_step(s / alpha_s, sn / alpha_t, eta=eta)
            out, den = run("cfgpp_euler", (alpha_s, s, alpha_t, alpha_t * sigma_down, alpha_t, s_noise, sigma_up),
                           x=x, cond=cond, uncond=uncond, noise=noise, store=run.den_store)
        run.report(x, i, sigmas[i], den)
        x = out
    return x


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args, callback, disable, eta=0.0, s_noise=0.0)


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                     eta=1.0, s_noise=1.0, noise_sampler=None):
    run = Stepper(model, x, sigmas, extra_args, callback, need_uncond=True)
    if noise_sampler is None:
        noise_sampler = _seeded(x, extra_args)
    for i in range(len(sigmas) - 1):
        s, sn = run.sig[i], run.sig[i + 1]
        cond, uncond = run.predict(x, s)
        sigma_down, sigma_up = get_ancestral_step(s, sn, eta=eta)
        if sigma_down == 0:
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) if sn > 0 else None
            out, den = run("cfgpp_euler", (1.0, s, 1.0, sigma_down, s_noise, sigma_up, 1.0),
                           x=x, cond=cond, uncond=uncond, noise=noise, store=run.den_store)
        else:
            t, t_next = s.log().neg(), sigma_down.log().neg()
            h = t_next - t
            sigma_s = (t + 0.5 * h).neg().exp()
            x_2, den = run("cfgpp_2s", (sigma_s / t.neg().exp(), (-h * 0.5).expm1(), *_NO_NOISE),
                           x=x, cond=cond, uncond=uncond, store=("den",))
            cond_2, uncond_2 = run.predict(x_2, sigma_s)
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) if sn > 0 else None
            out = run("cfgpp_2s", (t_next.neg().exp() / t.neg().exp(), (-h).expm1(), s_noise, sigma_up, 1.0),
                      x=x, cond=cond_2, uncond=uncond_2, den1=den, noise=noise)[0]
        run.report(x, i, sigmas[i], den)
        x = out
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    run = Stepper(model, x, sigmas, extra_args, callback, need_uncond=True)
    old_uncond = None
    for i in range(len(sigmas) - 1):
        s, sn = run.sig[i], run.sig[i + 1]
        cond, uncond = run.predict(x, s)
        t, t_next = s.log().neg(), sn.log().neg()
        h = t_next - t
        c, old = 0.0, None
        if old_uncond is not None and sn != 0:
            r = (t - run.sig[i - 1].log().neg()) / h
            c, old = torch.expm1(-h) * (1 / (2 * r)), old_uncond
        out, den = run("cfgpp_2m", (torch.exp(-h), -torch.exp(-h), c), x=x, cond=cond, uncond=uncond, old=old,
                       store=run.den_store)
        run.report(x, i, sigmas[i], den)
        x, old_uncond = out, uncond
    return x


def _phi1(t):
    return torch.expm1(t) / t


def _phi2(t):
    return (_phi1(t) - 1.0) / t


@torch.no_grad()
def res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                  noise_sampler=None, eta=1.0, cfg_pp=False):
    """The four RES variants; like the eager loop it skips the eta = 0 draws ComfyUI multiplies by 0."""
    run = Stepper(model, x, sigmas, extra_args, callback, need_uncond=cfg_pp)
    if noise_sampler is None and eta:
        noise_sampler = _seeded(x, extra_args)
    old = old_sigma_down = None
    for i in range(len(sigmas) - 1):
        s, sn = run.sig[i], run.sig[i + 1]
        cond, uncond = run.predict(x, s)
        sigma_down, sigma_up = get_ancestral_step(s, sn, eta=eta)
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if eta and sn > 0 else None
        noise_row = (s_noise, sigma_up, 1.0)
        if sigma_down == 0 or old is None:
            if cfg_pp:
                out, den = run("cfgpp_euler", (1.0, s, 1.0, sigma_down, *noise_row), x=x, cond=cond, uncond=uncond,
                               noise=noise, store=run.den_store)
            else:
                out, den = run("euler", (s, sigma_down - s, *noise_row), x=x, cond=cond, uncond=uncond,
                               noise=noise, store=("den",))
        else:
            t, t_old = s.log().neg(), old_sigma_down.log().neg()
            t_next, t_prev = sigma_down.log().neg(), run.sig[i - 1].log().neg()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = _phi1(-h), _phi2(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            out, den = run("res", (h.neg().exp(), h, b1, b2, *noise_row), x=x, cond=cond, uncond=uncond, old=old,
                           noise=noise, cfg_pp=int(cfg_pp), store=("den",))
        run.report(x, i, sigmas[i], den)
        x = out
        old, old_sigma_down = (uncond if cfg_pp else den), sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                         noise_sampler=None):
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=0.0)


@torch.no_grad()
def sample_res_multistep_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                                noise_sampler=None):
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=0.0,
                         cfg_pp=True)


@torch.no_grad()
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                   s_noise=1.0, noise_sampler=None):
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=eta)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                          eta=1.0, s_noise=1.0, noise_sampler=None):
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=eta,
                         cfg_pp=True)
