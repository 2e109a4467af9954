"""UniPC multistep (ComfyUI ``uni_pc``/``uni_pc_bh2``; Zhao et al., arXiv:2302.04867).

ComfyUI runs UniPC on a VP view of the sigma schedule (``comfy/extra_samplers/uni_pc.py``):
x is divided by sqrt(1 + sigma0^2), the model's denoised output is turned into eps and back into
a VP data prediction, and a final sigma of 0 is replaced by 0.001 (the solver cannot reach
lambda = inf) with the result divided by alpha(0.001) at the end.  Order min(3, steps - 1),
lowered on the last steps; every step but the last runs the corrector, whose model evaluation
is reused as the next step's history (so one model call per step).
"""
from __future__ import annotations

import torch

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


def _expand(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - 1)]


def vp_data_prediction(model, x, sigma, extra_args):
    """ComfyUI's model_fn: VP x -> model input x*sqrt(1+s^2) -> eps -> VP data prediction."""
    sigma_b = _expand(sigma, x.ndim)
    model_input = x * ((sigma_b ** 2 + 1.0) ** 0.5)
    eps = (model_input - model(model_input, sigma, **extra_args)) / sigma_b
    return (x - _expand(vp_std(sigma), x.ndim) * eps) / _expand(vp_alpha(sigma), x.ndim)


# --- one UniPC-B(h) step --------------------------------------------------------------------------

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


def unipc_bh_step(x, model_prev_list, sigma_prev_list, sigma, order, variant, model_t=None):
    """One UniPC-B(h) step from the last history point to ``sigma`` ([B]); pure.

    Without ``model_t`` this is the predictor; given the model's prediction at the predicted state
    it returns the corrected state instead (UniC, which reuses ``model_t`` as the next history point).
    """
    sigma_prev_0 = sigma_prev_list[-1]
    model_prev_0 = model_prev_list[-1]
    lambda_prev_0 = vp_lambda(sigma_prev_0)
    h = vp_lambda(sigma) - lambda_prev_0
    alpha_t = torch.exp(_log_alpha(sigma))

    rks, D1s = [], []
    for i in range(1, order):
        rk = ((vp_lambda(sigma_prev_list[-(i + 1)]) - lambda_prev_0) / h)[0]
        rks.append(rk)
        D1s.append((model_prev_list[-(i + 1)] - model_prev_0) / rk)
    rks.append(1.)
    rks = torch.tensor(rks, device=x.device)

    hh = -h[0]
    B_h, rhos_p, rhos_c = unipc_coefficients(rks, hh, order, variant)
    dims = x.dim()
    x_t_ = (_expand(vp_std(sigma) / vp_std(sigma_prev_0), dims) * x
            - _expand(alpha_t * torch.expm1(hh), dims) * model_prev_0)
    D1s = torch.stack(D1s, dim=1) if D1s else None
    if model_t is None:
        if D1s is None:
            return x_t_
        return x_t_ - _expand(alpha_t * B_h, dims) * torch.tensordot(D1s, rhos_p, dims=([1], [0]))
    corr_res = 0 if D1s is None else torch.tensordot(D1s, rhos_c[:-1], dims=([1], [0]))
    D1_t = model_t - model_prev_0
    return x_t_ - _expand(alpha_t * B_h, dims) * (corr_res + rhos_c[-1] * D1_t)


# --- the sampler ----------------------------------------------------------------------------------

@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, variant="bh1"):
    """ComfyUI's wrapper semantics, except that the caller's ``sigmas`` is not modified in place.

    ComfyUI writes 0.001 into ``sigmas[-1]`` of the caller's tensor; only the returned x is reproduced.
    With a single step (order 0) ComfyUI evaluates the model once and returns the rescaled input
    unchanged; that is reproduced too.  The callback gets ComfyUI's keys: x (VP-scaled), i, denoised.
    """
    extra_args = {} if extra_args is None else extra_args
    timesteps = sigmas.clone()
    if timesteps[-1] == 0:
        timesteps[-1] = FINAL_SIGMA
    batch = x.shape[0]

    def model_fn(x_vp, sigma):
        return vp_data_prediction(model, x_vp, sigma, extra_args)

    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    steps = len(timesteps) - 1
    order = min(3, len(timesteps) - 2)
    if steps >= 1:
        sigma_0 = timesteps[0].expand(batch)
        model_prev_list, sigma_prev_list = [model_fn(x, sigma_0)], [sigma_0]
        if callback is not None:
            callback({"x": x, "i": 0, "denoised": model_prev_list[-1]})
        for k in range(1, steps + 1 if order > 0 else 1):
            sigma_k = timesteps[k].expand(batch)
            use_corrector = k < steps
            step_order = min(k, order, steps + 1 - k)
            x_pred = unipc_bh_step(x, model_prev_list, sigma_prev_list, sigma_k, step_order, variant)
            if not use_corrector:
                x = x_pred
            else:
                model_x = model_fn(x_pred, sigma_k)
                x = unipc_bh_step(x, model_prev_list, sigma_prev_list, sigma_k, step_order, variant, model_x)
                model_prev_list = (model_prev_list + [model_x])[-order:]
                sigma_prev_list = (sigma_prev_list + [sigma_k])[-order:]
            if callback is not None and k != steps - 1:
                callback({"x": x, "i": min(k, steps - 1), "denoised": model_prev_list[-1]})
    return x / vp_alpha(timesteps[-1])


@torch.no_grad()
def sample_unipc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return sample_unipc(model, x, sigmas, extra_args, callback, disable, variant="bh2")
