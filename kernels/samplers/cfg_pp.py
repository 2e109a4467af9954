"""CFG++ samplers (ComfyUI ``sample_*_cfg_pp``; Chung et al. 2024): step with the *unconditional*
prediction while still landing on the guided one.

ComfyUI gets ``uncond_denoised`` through a post-CFG hook and sets ``disable_cfg1_optimization``;
here the loop asks the denoiser for the negative prediction (``need_uncond``) and the kernels read
it next to the guided one. euler_cfg_pp is the ancestral variant with eta = s_noise = 0 (an alias).
"""
from __future__ import annotations

import torch

from .common import get_ancestral_step
from .stepper import Stepper

_NO_NOISE = (0.0, 0.0, 0.0)


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                  eta=1.0, s_noise=1.0, noise_sampler=None):
    """DDIM-style CFG++ steps in half-log-SNR form (alpha = sigma * exp(lambda), 1 for eps)."""
    run = Stepper(model, x, sigmas, extra_args, callback, need_uncond=True, noise_sampler=noise_sampler)
    inject = eta > 0 and s_noise > 0
    lam = model.model_sampling.sigma_to_half_log_snr
    for i, s, sn in run.steps():
        prediction = run.predict(x, s)
        if sn == 0:
            out, den = run("denoised", _NO_NOISE, prediction, x=x, store=run.den_store)
        else:
            noise = run.noise(i) if inject else None
            alpha_s, alpha_t = s * lam(s).exp(), sn * lam(sn).exp()
            sigma_down, sigma_up = get_ancestral_step(s / alpha_s, sn / alpha_t, eta=eta)
            out, den = run("cfgpp_euler", (alpha_s, s, alpha_t, alpha_t * sigma_down, alpha_t, s_noise, sigma_up),
                           prediction, x=x, noise=noise, store=run.den_store)
        x = run.done(i, x, out, den)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                     eta=1.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(2S) ancestral CFG++: x shifted by the guidance (denoised - uncond) before each
    stage; as in ComfyUI the final shift uses the midpoint's uncond."""
    run = Stepper(model, x, sigmas, extra_args, callback, need_uncond=True, noise_sampler=noise_sampler)
    for i, s, sn, sigma_down, sigma_up in run.ancestral_steps(eta):
        prediction = run.predict(x, s)
        noise_row = (s_noise, sigma_up, 1.0)
        if sigma_down == 0:
            noise = run.noise(i) if sn > 0 else None
            out, den = run("cfgpp_euler", (1.0, s, 1.0, sigma_down, *noise_row), prediction, x=x, noise=noise,
                           store=run.den_store)
        else:
            t, t_next = s.log().neg(), sigma_down.log().neg()
            h = t_next - t
            sigma_s = (t + 0.5 * h).neg().exp()
            x_2, den = run("cfgpp_2s", (sigma_s / t.neg().exp(), (-h * 0.5).expm1(), *_NO_NOISE),
                           prediction, x=x, store=("den",))
            prediction = run.predict(x_2, sigma_s)
            noise = run.noise(i) if sn > 0 else None
            out = run("cfgpp_2s", (t_next.neg().exp() / t.neg().exp(), (-h).expm1(), *noise_row),
                      prediction, x=x, den1=den, noise=noise)[0]
        x = run.done(i, x, out, den)
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) on the uncond estimate; first and last steps are first order."""
    run = Stepper(model, x, sigmas, extra_args, callback, need_uncond=True)
    old_uncond = None
    for i, s, sn in run.steps():
        prediction = run.predict(x, s)
        t, t_next = s.log().neg(), sn.log().neg()
        h = t_next - t
        c, old = 0.0, None
        if old_uncond is not None and sn != 0:
            r = (t - run.sig[i - 1].log().neg()) / h
            c, old = torch.expm1(-h) * (1 / (2 * r)), old_uncond
        out, den = run("cfgpp_2m", (torch.exp(-h), -torch.exp(-h), c), prediction, x=x, old=old,
                       store=run.den_store)
        x, old_uncond = run.done(i, x, out, den), prediction.uncond
    return x
