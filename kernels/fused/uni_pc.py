"""Fused UniPC (``uni_pc`` / ``uni_pc_bh2``): one kernel per model evaluation.

After each model call the kernel turns cond/uncond into the VP data prediction, applies this
step's corrector (UniC) and already runs the next step's predictor, writing the next model input
(or, on the last step, the sampler's result). Mirrors ``kiln.kernels.samplers.uni_pc``, whose
coefficient helpers it calls on the host.
"""
from __future__ import annotations

import torch

from ..samplers.uni_pc import FINAL_SIGMA, unipc_coefficients, vp_alpha, vp_lambda, vp_std
from .loop import Stepper


def _c_in(sigma):
    """VP state -> model input factor, as the eager ``vp_data_prediction`` computes it."""
    return (sigma ** 2 + 1.0) ** 0.5


def _bh_row(sigma_hist: list, sigma, order: int, variant: str, predictor: bool) -> tuple:
    """Scalars of a UniPC-B(h) step of ``order`` from the newest history sigma to ``sigma``.

    Corrector: [a, b, cB, rho_t, rho1, rho2, r1, r2]; predictor: [a, b, cB, rho1, rho2, r1, r2].
    """
    sigma_prev_0 = sigma_hist[-1]
    lambda_prev_0 = vp_lambda(sigma_prev_0)
    h = vp_lambda(sigma) - lambda_prev_0
    rks = [(vp_lambda(sigma_hist[-(k + 1)]) - lambda_prev_0) / h for k in range(1, order)]
    hh = -h
    B_h, rhos_p, rhos_c = unipc_coefficients(torch.tensor(rks + [1.0]), hh, order, variant)
    alpha_t = vp_alpha(sigma)
    r = (list(rks) + [1.0, 1.0])[:2]
    head = (vp_std(sigma) / vp_std(sigma_prev_0), alpha_t * torch.expm1(hh), alpha_t * B_h)
    if predictor:
        rho = (list(rhos_p) if rhos_p is not None else []) + [0.0, 0.0]
        return head + (rho[0], rho[1], *r)
    rho = list(rhos_c[:-1]) + [0.0, 0.0]
    return head + (rhos_c[-1], rho[0], rho[1], *r)


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, variant="bh1"):
    """Same semantics as the eager ``sample_unipc`` (the caller's sigmas are not modified)."""
    run = Stepper(model, x, sigmas, extra_args)
    ts = run.sig.clone()
    if ts[-1] == 0:
        ts[-1] = FINAL_SIGMA
    x = x / torch.sqrt(1.0 + ts[0] ** 2.0)
    steps, order = len(ts) - 1, min(3, len(ts) - 2)
    if steps < 1:
        return x / vp_alpha(ts[-1])
    zeros8 = (0.0,) * 8
    x_in, model_in = x, x * _c_in(ts[0])   # the VP state the next model call sees, and its model input
    sigma_hist: list[torch.Tensor] = []
    m_hist: list[torch.Tensor] = []
    for k in range(steps if order > 0 else 1):
        cond, uncond = run.predict(model_in, ts[k])
        data = (_c_in(ts[k]), ts[k], vp_std(ts[k]), vp_alpha(ts[k]))
        nc, corrector = -1, zeros8
        if k > 0:
            step_order = min(k, order, steps + 1 - k)
            nc, corrector = step_order - 1, _bh_row(sigma_hist, ts[k], step_order, variant, predictor=False)
        n_pred, final, predictor = -1, 0, zeros8
        if order > 0:
            sigma_hist = (sigma_hist + [ts[k]])[-order:]
            next_order = min(k + 1, order, steps - k)
            final = int(k + 1 == steps)
            factor = vp_alpha(ts[-1]) if final else _c_in(ts[k + 1])
            n_pred = next_order - 1
            predictor = _bh_row(sigma_hist, ts[k + 1], next_order, variant, predictor=True) + (factor,)
        history = dict(zip(("m0", "m1", "m2"), reversed(m_hist)))
        out, m, x_pred, model_in = run("unipc", data + corrector + predictor, x=x, cond=cond, uncond=uncond,
                                       xin=x_in, **history, nc=nc, np=n_pred, final=final)
        x = x if out is None else out
        m_hist = (m_hist + [m])[-max(order, 1):]
        if callback is not None and (k == 0 or k != steps - 1):
            callback({"x": x, "i": k, "denoised": m})
        x_in = x_pred
    if order < 1:
        return x / vp_alpha(ts[-1])
    if callback is not None:
        callback({"x": x_pred, "i": steps - 1, "denoised": m_hist[-1]})
    return model_in


@torch.no_grad()
def sample_unipc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return sample_unipc(model, x, sigmas, extra_args, callback, disable, variant="bh2")
