"""Triton kernels: one elementwise launch per sampler step, CFG combine included.

Every kernel reads the model's ``cond``/``uncond`` predictions (``HAS_UNCOND = 0``: ``cond`` is
already the combined prediction; the CFG++ families, which read ``uncond`` themselves, say so with
``COMBINED = 1``), forms ``den = uncond + (cond - uncond) * scale`` in registers,
and writes the new state plus whatever history the sampler keeps. Scalars come from ``coef``,
a small fp32 tensor on the device (layout in each docstring, computed on the host by the sampler
loops in ``kiln.kernels.samplers``), so a step needs no host values and can sit inside a CUDA
graph. All math is fp32 whatever the storage dtype; the float operations follow the twins'
order (``twins.py``, ComfyUI's samplers' arithmetic), with correctly rounded division. In
interpret mode the kernels are bitwise equal to the twins; compiled for a GPU, Triton may
contract a*b+c into an FMA, a last-bit difference from eager torch.

Names of pointer arguments match the family specs in ``families.py``; the launcher passes inputs,
then outputs, then ``coef, scale, n`` and the ``tl.constexpr`` switches by keyword.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ld(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask).to(tl.float32)


@triton.jit
def _st(ptr, offs, mask, value):
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _div(a, b):
    """IEEE round-to-nearest division, as torch divides (Triton's ``/`` on fp32 is approximate on GPUs)."""
    return tl.math.div_rn(a, b)


@triton.jit
def _c(coef_ptr, k: tl.constexpr):
    return tl.load(coef_ptr + k)


@triton.jit
def _cfg(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND: tl.constexpr):
    """ComfyUI's cfg_function: ``uncond + (cond - uncond) * scale``."""
    den = _ld(cond_ptr, offs, mask)
    if HAS_UNCOND:
        uncond = _ld(uncond_ptr, offs, mask)
        den = uncond + (den - uncond) * scale
    return den


@triton.jit
def _guided(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND: tl.constexpr, COMBINED: tl.constexpr):
    """For the families that also read ``uncond`` (CFG++): ``cond`` may already be the guided prediction."""
    if COMBINED:
        den = _ld(cond_ptr, offs, mask)
    else:
        den = _cfg(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND)
    return den


@triton.jit
def _noise(out, noise_ptr, offs, mask, coef_ptr, k: tl.constexpr, HAS_NOISE: tl.constexpr):
    """``out + noise * coef[k] * coef[k+1] * coef[k+2]`` (products left to right, as the samplers write them)."""
    if HAS_NOISE:
        out = out + _ld(noise_ptr, offs, mask) * _c(coef_ptr, k) * _c(coef_ptr, k + 1) * _c(coef_ptr, k + 2)
    return out


@triton.jit
def _offsets(n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def denoised_kernel(x_ptr, cond_ptr, uncond_ptr, noise_ptr, out_ptr, den_ptr, coef_ptr, scale, n,
                    HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, STORE_DEN: tl.constexpr,
                    BLOCK: tl.constexpr):
    """out = den (+ noise n0 n1 n2). coef: [n0, n1, n2]. Final steps (x = denoised), lcm."""
    offs, mask = _offsets(n, BLOCK)
    den = _cfg(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND)
    _st(out_ptr, offs, mask, _noise(den, noise_ptr, offs, mask, coef_ptr, 0, HAS_NOISE))
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def euler_kernel(x_ptr, cond_ptr, uncond_ptr, y_ptr, noise_ptr, out_ptr, den_ptr, coef_ptr, scale, n,
                 HAS_UNCOND: tl.constexpr, HAS_Y: tl.constexpr, HAS_NOISE: tl.constexpr,
                 STORE_DEN: tl.constexpr, BLOCK: tl.constexpr):
    """out = x + ((y - den) / sigma) * dt (+ noise). coef: [sigma, dt, n0, n1, n2].

    y (the state the model saw) defaults to x; dpm_2's second stage passes its midpoint state.
    """
    offs, mask = _offsets(n, BLOCK)
    den = _cfg(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND)
    x = _ld(x_ptr, offs, mask)
    y = x
    if HAS_Y:
        y = _ld(y_ptr, offs, mask)
    out = x + _div(y - den, _c(coef_ptr, 0)) * _c(coef_ptr, 1)
    _st(out_ptr, offs, mask, _noise(out, noise_ptr, offs, mask, coef_ptr, 2, HAS_NOISE))
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def heun_kernel(x_ptr, cond_ptr, uncond_ptr, x2_ptr, den1_ptr, out_ptr, den_ptr, coef_ptr, scale, n,
                HAS_UNCOND: tl.constexpr, STORE_DEN: tl.constexpr, BLOCK: tl.constexpr):
    """Heun corrector: out = x + ((d + d2) / 2) * dt. coef: [sigma, sigma_next, dt]."""
    offs, mask = _offsets(n, BLOCK)
    den = _cfg(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND)
    x = _ld(x_ptr, offs, mask)
    d = _div(x - _ld(den1_ptr, offs, mask), _c(coef_ptr, 0))
    d2 = _div(_ld(x2_ptr, offs, mask) - den, _c(coef_ptr, 1))
    _st(out_ptr, offs, mask, x + (d + d2) * 0.5 * _c(coef_ptr, 2))   # / 2 is exact as * 0.5
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def multistep_kernel(x_ptr, cond_ptr, uncond_ptr, h1_ptr, h2_ptr, h3_ptr, out_ptr, d_ptr, den_ptr,
                     coef_ptr, scale, n, HAS_UNCOND: tl.constexpr, HAS_H1: tl.constexpr,
                     HAS_H2: tl.constexpr, HAS_H3: tl.constexpr, STORE_D: tl.constexpr,
                     STORE_DEN: tl.constexpr, SEQUENTIAL: tl.constexpr, BLOCK: tl.constexpr):
    """Adams-type step on Karras derivatives d = (x - den) / sigma, history h1.. newest first.

    coef: [sigma, scale, div, w0, w1, w2, w3].
    SEQUENTIAL = 0 (lms, ipndm, ipndm_v): out = x + (scale * (w0 d + w1 h1 + ...)) / div;
    SEQUENTIAL = 1 (deis): out = ((x + w0 d) + w1 h1) + ...
    """
    offs, mask = _offsets(n, BLOCK)
    den = _cfg(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND)
    x = _ld(x_ptr, offs, mask)
    d = _div(x - den, _c(coef_ptr, 0))
    if SEQUENTIAL:
        acc = x + _c(coef_ptr, 3) * d
    else:
        acc = _c(coef_ptr, 3) * d
    if HAS_H1:
        acc = acc + _c(coef_ptr, 4) * _ld(h1_ptr, offs, mask)
    if HAS_H2:
        acc = acc + _c(coef_ptr, 5) * _ld(h2_ptr, offs, mask)
    if HAS_H3:
        acc = acc + _c(coef_ptr, 6) * _ld(h3_ptr, offs, mask)
    if SEQUENTIAL:
        out = acc
    else:
        out = x + _div(_c(coef_ptr, 1) * acc, _c(coef_ptr, 2))
    _st(out_ptr, offs, mask, out)
    if STORE_D:
        _st(d_ptr, offs, mask, d)
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def expint_kernel(x_ptr, cond_ptr, uncond_ptr, old_ptr, noise_ptr, out_ptr, den_ptr, coef_ptr, scale, n,
                  HAS_UNCOND: tl.constexpr, HAS_OLD: tl.constexpr, HAS_NOISE: tl.constexpr,
                  STORE_DEN: tl.constexpr, BLOCK: tl.constexpr):
    """Exponential-integrator step out = a x - b dd (+ noise), dd = w_old old + w_new den or den.

    coef: [a, b, w_old, w_new, n0, n1, n2]. dpmpp_2m, both dpmpp_2s_ancestral stages, both
    dpmpp_sde sub-steps (``old`` = the first stage's prediction).
    """
    offs, mask = _offsets(n, BLOCK)
    den = _cfg(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND)
    dd = den
    if HAS_OLD:
        dd = _c(coef_ptr, 2) * _ld(old_ptr, offs, mask) + _c(coef_ptr, 3) * den
    out = _c(coef_ptr, 0) * _ld(x_ptr, offs, mask) - _c(coef_ptr, 1) * dd
    _st(out_ptr, offs, mask, _noise(out, noise_ptr, offs, mask, coef_ptr, 4, HAS_NOISE))
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def sde_multistep_kernel(x_ptr, cond_ptr, uncond_ptr, h1_ptr, h2_ptr, noise_ptr, out_ptr, den_ptr,
                         coef_ptr, scale, n, HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr,
                         STORE_DEN: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """DPM-Solver++(2M/3M) SDE: out = a x + b den + correction (+ noise); h1, h2 = older predictions.

    coef: [a, b, c, r0, r1, r0 + r1, p3, n0, n1, n2]. MODE 0: first order; 1: 2M, + c (den - h1);
    2: 3M with one old prediction, + c ((den - h1) / r0); 3: full 3M, + c d1 - p3 d2.
    """
    offs, mask = _offsets(n, BLOCK)
    den = _cfg(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND)
    out = _c(coef_ptr, 0) * _ld(x_ptr, offs, mask) + _c(coef_ptr, 1) * den
    if MODE == 1:
        out = out + _c(coef_ptr, 2) * (den - _ld(h1_ptr, offs, mask))
    if MODE == 2:
        out = out + _c(coef_ptr, 2) * _div(den - _ld(h1_ptr, offs, mask), _c(coef_ptr, 3))
    if MODE == 3:
        h1 = _ld(h1_ptr, offs, mask)
        d1_0 = _div(den - h1, _c(coef_ptr, 3))
        d1_1 = _div(h1 - _ld(h2_ptr, offs, mask), _c(coef_ptr, 4))
        d1 = d1_0 + _div((d1_0 - d1_1) * _c(coef_ptr, 3), _c(coef_ptr, 5))
        d2 = _div(d1_0 - d1_1, _c(coef_ptr, 5))
        out = out + _c(coef_ptr, 2) * d1 - _c(coef_ptr, 6) * d2
    _st(out_ptr, offs, mask, _noise(out, noise_ptr, offs, mask, coef_ptr, 7, HAS_NOISE))
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def res_kernel(x_ptr, cond_ptr, uncond_ptr, old_ptr, noise_ptr, out_ptr, den_ptr, coef_ptr, scale, n,
               HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, STORE_DEN: tl.constexpr,
               CFG_PP: tl.constexpr, COMBINED: tl.constexpr, BLOCK: tl.constexpr):
    """RES multistep: out = e x + h (b1 p + b2 old) (+ noise). coef: [e, h, b1, b2, n0, n1, n2].

    p = den; with CFG_PP, p = uncond and x is first shifted by (den - uncond).
    """
    offs, mask = _offsets(n, BLOCK)
    den = _guided(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND, COMBINED)
    x = _ld(x_ptr, offs, mask)
    p = den
    if CFG_PP:
        p = _ld(uncond_ptr, offs, mask)
        x = x + (den - p)
    out = _c(coef_ptr, 0) * x + _c(coef_ptr, 1) * (_c(coef_ptr, 2) * p + _c(coef_ptr, 3) * _ld(old_ptr, offs, mask))
    _st(out_ptr, offs, mask, _noise(out, noise_ptr, offs, mask, coef_ptr, 4, HAS_NOISE))
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def cfgpp_euler_kernel(x_ptr, cond_ptr, uncond_ptr, noise_ptr, out_ptr, den_ptr, coef_ptr, scale, n,
                       HAS_NOISE: tl.constexpr, STORE_DEN: tl.constexpr, COMBINED: tl.constexpr,
                       BLOCK: tl.constexpr):
    """CFG++ Euler: d = (x - alpha_s uncond) / sigma, out = alpha_t den + sigma_down d (+ noise).

    coef: [alpha_s, sigma, alpha_t, sigma_down, n0, n1, n2].
    """
    offs, mask = _offsets(n, BLOCK)
    den = _guided(cond_ptr, uncond_ptr, offs, mask, scale, True, COMBINED)
    d = _div(_ld(x_ptr, offs, mask) - _c(coef_ptr, 0) * _ld(uncond_ptr, offs, mask), _c(coef_ptr, 1))
    out = _c(coef_ptr, 2) * den + _c(coef_ptr, 3) * d
    _st(out_ptr, offs, mask, _noise(out, noise_ptr, offs, mask, coef_ptr, 4, HAS_NOISE))
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def cfgpp_2s_kernel(x_ptr, cond_ptr, uncond_ptr, den1_ptr, noise_ptr, out_ptr, den_ptr, coef_ptr, scale, n,
                    HAS_DEN1: tl.constexpr, HAS_NOISE: tl.constexpr, STORE_DEN: tl.constexpr,
                    COMBINED: tl.constexpr, BLOCK: tl.constexpr):
    """DPM++(2S) CFG++ stage: out = a (x + (g - uncond)) - b den (+ noise). coef: [a, b, n0, n1, n2].

    g is this call's den on the first stage, the first stage's den (``den1``) on the second.
    """
    offs, mask = _offsets(n, BLOCK)
    den = _guided(cond_ptr, uncond_ptr, offs, mask, scale, True, COMBINED)
    g = den
    if HAS_DEN1:
        g = _ld(den1_ptr, offs, mask)
    out = _c(coef_ptr, 0) * (_ld(x_ptr, offs, mask) + (g - _ld(uncond_ptr, offs, mask))) - _c(coef_ptr, 1) * den
    _st(out_ptr, offs, mask, _noise(out, noise_ptr, offs, mask, coef_ptr, 2, HAS_NOISE))
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def cfgpp_2m_kernel(x_ptr, cond_ptr, uncond_ptr, old_ptr, out_ptr, den_ptr, coef_ptr, scale, n,
                    HAS_OLD: tl.constexpr, STORE_DEN: tl.constexpr, COMBINED: tl.constexpr, BLOCK: tl.constexpr):
    """DPM++(2M) CFG++: out = (den + (neg_e uncond [- c (den - old)])) + e x. coef: [e, neg_e, c]."""
    offs, mask = _offsets(n, BLOCK)
    den = _guided(cond_ptr, uncond_ptr, offs, mask, scale, True, COMBINED)
    mix = _c(coef_ptr, 1) * _ld(uncond_ptr, offs, mask)
    if HAS_OLD:
        mix = mix - _c(coef_ptr, 2) * (den - _ld(old_ptr, offs, mask))
    _st(out_ptr, offs, mask, den + mix + _c(coef_ptr, 0) * _ld(x_ptr, offs, mask))
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def ddpm_kernel(x_ptr, cond_ptr, uncond_ptr, noise_ptr, out_ptr, den_ptr, coef_ptr, scale, n,
                HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, STORE_DEN: tl.constexpr,
                RESCALE: tl.constexpr, BLOCK: tl.constexpr):
    """DDPM ancestral step in VP space. coef: [vp, sigma, c1, c2, c3, n0, n1, n2, rescale].

    mu = c1 (x / vp - (c2 ((x - den) / sigma)) / c3) (+ noise), then * rescale when sigma_next != 0.
    """
    offs, mask = _offsets(n, BLOCK)
    den = _cfg(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND)
    x = _ld(x_ptr, offs, mask)
    eps = _div(x - den, _c(coef_ptr, 1))
    mu = _c(coef_ptr, 2) * (_div(x, _c(coef_ptr, 0)) - _div(_c(coef_ptr, 3) * eps, _c(coef_ptr, 4)))
    mu = _noise(mu, noise_ptr, offs, mask, coef_ptr, 5, HAS_NOISE)
    if RESCALE:
        mu = mu * _c(coef_ptr, 8)
    _st(out_ptr, offs, mask, mu)
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def er_sde_kernel(x_ptr, cond_ptr, uncond_ptr, old_ptr, old_d_ptr, noise_ptr, out_ptr, den_ptr, den_d_ptr,
                  coef_ptr, scale, n, HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr,
                  STORE_DEN: tl.constexpr, STORE_DEN_D: tl.constexpr, STAGE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """ER-SDE stage 1-3: out = a x + b den [+ c_d den_d [+ c_u den_u]] (+ noise).

    coef: [a, b, dl1, c_d, dl2, c_u, n0, n1, n2]; den_d = (den - old) / dl1,
    den_u = (den_d - old_d) / dl2.
    """
    offs, mask = _offsets(n, BLOCK)
    den = _cfg(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND)
    out = _c(coef_ptr, 0) * _ld(x_ptr, offs, mask) + _c(coef_ptr, 1) * den
    if STAGE >= 2:
        den_d = _div(den - _ld(old_ptr, offs, mask), _c(coef_ptr, 2))
        out = out + _c(coef_ptr, 3) * den_d
        if STAGE >= 3:
            den_u = _div(den_d - _ld(old_d_ptr, offs, mask), _c(coef_ptr, 4))
            out = out + _c(coef_ptr, 5) * den_u
        if STORE_DEN_D:
            _st(den_d_ptr, offs, mask, den_d)
    _st(out_ptr, offs, mask, _noise(out, noise_ptr, offs, mask, coef_ptr, 6, HAS_NOISE))
    if STORE_DEN:
        _st(den_ptr, offs, mask, den)


@triton.jit
def unipc_kernel(x_ptr, cond_ptr, uncond_ptr, xin_ptr, m0_ptr, m1_ptr, m2_ptr, out_ptr, m_ptr, xp_ptr,
                 xm_ptr, coef_ptr, scale, n, HAS_UNCOND: tl.constexpr, NC: tl.constexpr, NP: tl.constexpr,
                 FINAL: tl.constexpr, BLOCK: tl.constexpr):
    """UniPC: data prediction at xin, corrector of this step, predictor of the next, in one pass.

    coef[0:4]  data prediction [c_in, sigma, std, alpha]: m = (xin - std ((xin c_in - den) / sigma)) / alpha
    coef[4:12] corrector [a, b, cB, rho_t, rho1, rho2, r1, r2] on x with history m0, m1, m2;
               NC = number of older points it uses (-1: no corrector, out = xin).
    coef[12:20] predictor from (out, m) [a, b, cB, rho1, rho2, r1, r2, c] with older points m0, m1
               (NP = their number, -1: no predictor): xp = x_pred and xm = x_pred * c, the next
               model input, or with FINAL xm = x_pred / c, the sampler's result.
    """
    offs, mask = _offsets(n, BLOCK)
    den = _cfg(cond_ptr, uncond_ptr, offs, mask, scale, HAS_UNCOND)
    xin = _ld(xin_ptr, offs, mask)
    eps = _div(xin * _c(coef_ptr, 0) - den, _c(coef_ptr, 1))
    m = _div(xin - _c(coef_ptr, 2) * eps, _c(coef_ptr, 3))
    _st(m_ptr, offs, mask, m)
    out = xin
    if NC >= 0:
        m0 = _ld(m0_ptr, offs, mask)
        out = _c(coef_ptr, 4) * _ld(x_ptr, offs, mask) - _c(coef_ptr, 5) * m0
        corr = _c(coef_ptr, 7) * (m - m0)
        if NC >= 1:
            res = _div(_ld(m1_ptr, offs, mask) - m0, _c(coef_ptr, 10)) * _c(coef_ptr, 8)
            if NC >= 2:
                res = res + _div(_ld(m2_ptr, offs, mask) - m0, _c(coef_ptr, 11)) * _c(coef_ptr, 9)
            corr = res + corr
        out = out - _c(coef_ptr, 6) * corr
        _st(out_ptr, offs, mask, out)
    if NP >= 0:
        xp = _c(coef_ptr, 12) * out - _c(coef_ptr, 13) * m
        if NP >= 1:
            pres = _div(_ld(m0_ptr, offs, mask) - m, _c(coef_ptr, 17)) * _c(coef_ptr, 15)
            if NP >= 2:
                pres = pres + _div(_ld(m1_ptr, offs, mask) - m, _c(coef_ptr, 18)) * _c(coef_ptr, 16)
            xp = xp - _c(coef_ptr, 14) * pres
        _st(xp_ptr, offs, mask, xp)
        if FINAL:
            _st(xm_ptr, offs, mask, _div(xp, _c(coef_ptr, 19)))
        else:
            _st(xm_ptr, offs, mask, xp * _c(coef_ptr, 19))
