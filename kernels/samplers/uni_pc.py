"""UniPC multistep (ComfyUI ``uni_pc``/``uni_pc_bh2``; Zhao et al., arXiv:2302.04867).

ComfyUI runs UniPC on a VP view of the sigma schedule (``comfy/extra_samplers/uni_pc.py``):
x is divided by sqrt(1 + sigma0^2), the model's denoised output is turned into eps and back into
a VP data prediction, and a final sigma of 0 is replaced by 0.001 (the solver cannot reach
lambda = inf) with the result divided by alpha(0.001) at the end. Order min(3, steps - 1),
lowered on the last steps; every step but the last runs the corrector, whose model evaluation
is reused as the next step's history (so one model call per step).

One ``unipc`` kernel per model evaluation turns the prediction into the VP data prediction,
applies this step's corrector (UniC) and already runs the next step's predictor, writing the
next model input (or, on the last step, the sampler's result).
"""
from __future__ import annotations

import torch

from .stepper import Stepper

FINAL_SIGMA = 0.001


# --- the VP view of a sigma (ComfyUI's SigmaConvert) ---------------------------------------------

def _log_alpha(sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def vp_alpha(sigma: torch.Tensor) -> torch.Tensor:
    return torch.exp(_log_alpha(sigma))


def vp_std(sigma: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(1. - torch.exp(2. * _log_alpha(sigma)))


def vp_lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half-log-SNR log(alpha) - log(std)."""
    log_alpha = _log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1. - torch.exp(2. * log_alpha))


def _c_in(sigma):
    """VP state -> model input factor, ``sqrt(sigma^2 + 1)``."""
    return (sigma ** 2 + 1.0) ** 0.5


# --- the coefficients of one UniPC-B(h) step ------------------------------------------------------

def unipc_coefficients(rks: torch.Tensor, hh: torch.Tensor, order: int, variant: str):
    """(B_h, rhos_p, rhos_c) for a step of ``order``; rks are r_k = (lambda_k - lambda_prev0)/h then 1."""
    h_phi_k = torch.expm1(hh) / hh - 1
    if variant == "bh1":
        B_h = hh
    elif variant == "bh2":
        B_h = torch.expm1(hh)
    else:
        raise ValueError(f"unknown UniPC variant {variant!r}")
    R, b = [], []
    factorial_i = 1
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    R = torch.stack(R)
    b = torch.tensor(b, device=rks.device)
    if order == 2:
        rhos_p = torch.tensor([0.5], device=b.device)
    elif order > 2:
        rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1])
    else:
        rhos_p = None
    rhos_c = torch.tensor([0.5], device=b.device) if order == 1 else torch.linalg.solve(R, b)
    return B_h, rhos_p, rhos_c


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


# --- the sampler ----------------------------------------------------------------------------------

@torch.no_grad()
def sample_uni_pc(model, x, sigmas, extra_args=None, callback=None, disable=None, variant="bh1"):
    """ComfyUI's wrapper semantics, except that the caller's ``sigmas`` is not modified in place.

    ComfyUI writes 0.001 into ``sigmas[-1]`` of the caller's tensor; only the returned x is reproduced.
    With a single step (order 0) ComfyUI evaluates the model once and returns the rescaled input
    unchanged; that is reproduced too. The callback gets ComfyUI's keys: x (VP-scaled), i, denoised.
    """
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
    for k in range(steps if order > 0 else 1):   # ComfyUI's own step order: ts, not the caller's sigmas
        prediction = run.predict(model_in, ts[k])
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
        out, m, x_pred, model_in = run("unipc", data + corrector + predictor, prediction, x=x, xin=x_in,
                                       **history, nc=nc, np=n_pred, final=final)
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
