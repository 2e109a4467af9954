"""Plain-torch twins of the Triton step kernels: same arguments, same float operations, same order.

They are the reference the kernels are tested against, the CPU implementation of the
``kiln::fused_*`` ops, and what runs everywhere but on CUDA (they are also what inductor
fuses on CPU). Every twin computes in fp32 and returns outputs in ``x``'s dtype, as a tuple in
the family's output order with None for outputs that were not asked for (see ``families.FAMILIES``).
Coefficient layouts are documented on the kernels in ``triton_kernels.py``.
"""
from __future__ import annotations

import torch

from kiln.kernels.cfg import cfg_combine as _cfg


def _guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float, combined: int) -> torch.Tensor:
    """The families that also read ``uncond`` (CFG++): ``cond`` may already be the guided prediction."""
    return cond.float() if combined else _cfg(cond, uncond, scale)


def _noise(out: torch.Tensor, noise: torch.Tensor | None, c: torch.Tensor, k: int) -> torch.Tensor:
    if noise is None:
        return out
    return out + noise.float() * c[k] * c[k + 1] * c[k + 2]


def _cast(x: torch.Tensor, *outs: torch.Tensor | None) -> tuple:
    return tuple(None if o is None else o.to(x.dtype) for o in outs)


def denoised(coef, scale, x, cond, uncond=None, noise=None, store_den=False):
    den = _cfg(cond, uncond, scale)
    return _cast(x, _noise(den, noise, coef, 0), den if store_den else None)


def euler(coef, scale, x, cond, uncond=None, y=None, noise=None, store_den=False):
    den = _cfg(cond, uncond, scale)
    xf = x.float()
    yf = xf if y is None else y.float()
    out = xf + ((yf - den) / coef[0]) * coef[1]
    return _cast(x, _noise(out, noise, coef, 2), den if store_den else None)


def heun(coef, scale, x, cond, uncond=None, x2=None, den1=None, store_den=False):
    den = _cfg(cond, uncond, scale)
    xf = x.float()
    d = (xf - den1.float()) / coef[0]
    d2 = (x2.float() - den) / coef[1]
    return _cast(x, xf + (d + d2) / 2 * coef[2], den if store_den else None)


def multistep(coef, scale, x, cond, uncond=None, h1=None, h2=None, h3=None, store_d=False, store_den=False,
              sequential=0):
    den = _cfg(cond, uncond, scale)
    xf = x.float()
    d = (xf - den) / coef[0]
    acc = xf + coef[3] * d if sequential else coef[3] * d
    for k, h in ((4, h1), (5, h2), (6, h3)):
        if h is not None:
            acc = acc + coef[k] * h.float()
    out = acc if sequential else xf + coef[1] * acc / coef[2]
    return _cast(x, out, d if store_d else None, den if store_den else None)


def expint(coef, scale, x, cond, uncond=None, old=None, noise=None, store_den=False):
    den = _cfg(cond, uncond, scale)
    dd = den if old is None else coef[2] * old.float() + coef[3] * den
    out = coef[0] * x.float() - coef[1] * dd
    return _cast(x, _noise(out, noise, coef, 4), den if store_den else None)


def sde_multistep(coef, scale, x, cond, uncond=None, h1=None, h2=None, noise=None, store_den=False, mode=0):
    den = _cfg(cond, uncond, scale)
    out = coef[0] * x.float() + coef[1] * den
    if mode == 1:
        out = out + coef[2] * (den - h1.float())
    elif mode == 2:
        out = out + coef[2] * ((den - h1.float()) / coef[3])
    elif mode == 3:
        d1_0 = (den - h1.float()) / coef[3]
        d1_1 = (h1.float() - h2.float()) / coef[4]
        d1 = d1_0 + (d1_0 - d1_1) * coef[3] / coef[5]
        d2 = (d1_0 - d1_1) / coef[5]
        out = out + coef[2] * d1 - coef[6] * d2
    return _cast(x, _noise(out, noise, coef, 7), den if store_den else None)


def res(coef, scale, x, cond, uncond=None, old=None, noise=None, store_den=False, cfg_pp=0, combined=0):
    den = _guided(cond, uncond, scale, combined)
    xf = x.float()
    p = den
    if cfg_pp:
        p = uncond.float()
        xf = xf + (den - p)
    out = coef[0] * xf + coef[1] * (coef[2] * p + coef[3] * old.float())
    return _cast(x, _noise(out, noise, coef, 4), den if store_den else None)


def cfgpp_euler(coef, scale, x, cond, uncond=None, noise=None, store_den=False, combined=0):
    den = _guided(cond, uncond, scale, combined)
    d = (x.float() - coef[0] * uncond.float()) / coef[1]
    out = coef[2] * den + coef[3] * d
    return _cast(x, _noise(out, noise, coef, 4), den if store_den else None)


def cfgpp_2s(coef, scale, x, cond, uncond=None, den1=None, noise=None, store_den=False, combined=0):
    den = _guided(cond, uncond, scale, combined)
    g = den if den1 is None else den1.float()
    out = coef[0] * (x.float() + (g - uncond.float())) - coef[1] * den
    return _cast(x, _noise(out, noise, coef, 2), den if store_den else None)


def cfgpp_2m(coef, scale, x, cond, uncond=None, old=None, store_den=False, combined=0):
    den = _guided(cond, uncond, scale, combined)
    mix = coef[1] * uncond.float()
    if old is not None:
        mix = mix - coef[2] * (den - old.float())
    return _cast(x, den + mix + coef[0] * x.float(), den if store_den else None)


def ddpm(coef, scale, x, cond, uncond=None, noise=None, store_den=False, rescale=0):
    den = _cfg(cond, uncond, scale)
    xf = x.float()
    eps = (xf - den) / coef[1]
    mu = coef[2] * (xf / coef[0] - coef[3] * eps / coef[4])
    mu = _noise(mu, noise, coef, 5)
    if rescale:
        mu = mu * coef[8]
    return _cast(x, mu, den if store_den else None)


def er_sde(coef, scale, x, cond, uncond=None, old=None, old_d=None, noise=None, store_den=False,
           store_den_d=False, stage=1):
    den = _cfg(cond, uncond, scale)
    out = coef[0] * x.float() + coef[1] * den
    den_d = None
    if stage >= 2:
        den_d = (den - old.float()) / coef[2]
        out = out + coef[3] * den_d
        if stage >= 3:
            out = out + coef[5] * ((den_d - old_d.float()) / coef[4])
    return _cast(x, _noise(out, noise, coef, 6), den if store_den else None, den_d if store_den_d else None)


def unipc(coef, scale, x, cond, uncond=None, xin=None, m0=None, m1=None, m2=None, nc=-1, np=-1, final=0):
    den = _cfg(cond, uncond, scale)
    xin_f = xin.float()
    m = (xin_f - coef[2] * ((xin_f * coef[0] - den) / coef[1])) / coef[3]
    out = xp = xm = None
    if nc >= 0:
        m0f = m0.float()
        corr = coef[7] * (m - m0f)
        if nc >= 1:
            res_ = (m1.float() - m0f) / coef[10] * coef[8]
            if nc >= 2:
                res_ = res_ + (m2.float() - m0f) / coef[11] * coef[9]
            corr = res_ + corr
        out = coef[4] * x.float() - coef[5] * m0f - coef[6] * corr
    if np >= 0:
        base = xin_f if out is None else out
        xp = coef[12] * base - coef[13] * m
        if np >= 1:
            pres = (m0.float() - m) / coef[17] * coef[15]
            if np >= 2:
                pres = pres + (m1.float() - m) / coef[18] * coef[16]
            xp = xp - coef[14] * pres
        xm = xp / coef[19] if final else xp * coef[19]
    return _cast(x, out, m, xp, xm)
