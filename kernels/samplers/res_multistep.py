"""RES multistep samplers (ComfyUI ``res_multistep*``; Zhang et al., arXiv:2308.02157).

A second-order exponential multistep method in log-sigma time that reuses the previous
denoised estimate, with optional ancestral noise (eta) and a CFG++ flavour that steps on the
unconditional prediction. The four ComfyUI names are aliases of ``sample_res_multistep``
(``kiln.kernels.samplers``).
"""
from __future__ import annotations

import torch

from .stepper import Stepper


def _phi1(t):
    return torch.expm1(t) / t


def _phi2(t):
    return (_phi1(t) - 1.0) / t


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                         noise_sampler=None, eta=0.0, cfg_pp=False):
    """Euler on the first step and when sigma_down is 0, else the RES update. With eta = 0
    ComfyUI still draws (and multiplies by 0) one noise tensor per step; those draws are skipped."""
    run = Stepper(model, x, sigmas, extra_args, callback, need_uncond=cfg_pp, noise_sampler=noise_sampler)
    old = old_sigma_down = None
    for i, s, sn, sigma_down, sigma_up in run.ancestral_steps(eta):
        prediction = run.predict(x, s)
        noise = run.noise(i) if eta and sn > 0 else None
        noise_row = (s_noise, sigma_up, 1.0)
        if sigma_down == 0 or old is None:
            if cfg_pp:
                out, den = run("cfgpp_euler", (1.0, s, 1.0, sigma_down, *noise_row), prediction, x=x, noise=noise,
                               store=run.den_store)
            else:
                out, den = run("euler", (s, sigma_down - s, *noise_row), prediction, x=x, noise=noise,
                               store=("den",))
        else:
            t, t_old = s.log().neg(), old_sigma_down.log().neg()
            t_next, t_prev = sigma_down.log().neg(), run.sig[i - 1].log().neg()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = _phi1(-h), _phi2(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            out, den = run("res", (h.neg().exp(), h, b1, b2, *noise_row), prediction, x=x, old=old, noise=noise,
                           cfg_pp=int(cfg_pp), store=("den",))
        x = run.done(i, x, out, den)
        old, old_sigma_down = (prediction.uncond if cfg_pp else den), sigma_down
    return x
