"""Linear multistep samplers from ComfyUI: iPNDM, iPNDM-v, DEIS and gradient estimation.

iPNDM/iPNDM-v/DEIS follow zju-pi/diff-sampler as ComfyUI vendors it: Adams-Bashforth steps in
sigma on the Karras derivative ``d = (x - denoised) / sigma``, warming up from Euler, and jumping
straight to ``denoised`` (or an Euler step, for DEIS) on the step to sigma = 0.
"""
from __future__ import annotations

import torch

from kiln.kernels.samplers.cfg_pp import with_uncond_capture
from kiln.kernels.samplers.common import to_d


def _push(history: list, d: torch.Tensor, size: int) -> None:
    """Keep the newest ``size`` derivatives, oldest first."""
    history.append(d)
    del history[:max(0, len(history) - size)]


# --- iPNDM (fixed Adams-Bashforth coefficients) -------------------------------------------------

def ipndm_step(x, d_cur, history, sigma, sigma_next, order):
    """Adams-Bashforth of ``order`` 1-4 with equal-step coefficients (history newest last)."""
    dt = sigma_next - sigma
    if order == 1:
        return x + dt * d_cur
    if order == 2:
        return x + dt * (3 * d_cur - history[-1]) / 2
    if order == 3:
        return x + dt * (23 * d_cur - 16 * history[-1] + 5 * history[-2]) / 12
    return x + dt * (55 * d_cur - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d_cur = (x - denoised) / sigmas[i]
        if sigmas[i + 1] == 0:
            x_next = denoised
        else:
            x_next = ipndm_step(x, d_cur, history, sigmas[i], sigmas[i + 1], min(max_order, i + 1))
        _push(history, d_cur, max_order - 1)
        x = x_next
    return x


# --- iPNDM-v (variable-step coefficients) ---------------------------------------------------------

def ipndm_v_coefficients(sigma_window, order):
    """Variable-step AB weights (order 2-4) for (d_cur, d_prev1, ...) from sigmas [.., s_i, s_{i+1}]."""
    t_next, t_cur = sigma_window[-1], sigma_window[-2]
    h_n = t_next - t_cur
    h_n_1 = t_cur - sigma_window[-3]
    if order == 2:
        return ((2 + (h_n / h_n_1)) / 2, -(h_n / h_n_1) / 2)
    h_n_2 = sigma_window[-3] - sigma_window[-4]
    temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if order == 3:
        return ((2 + (h_n / h_n_1)) / 2 + temp1,
                -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1,
                temp1 * h_n_1 / h_n_2)
    h_n_3 = sigma_window[-4] - sigma_window[-5]
    temp2 = (((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2)))
             * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3)))
    ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    return ((2 + (h_n / h_n_1)) / 2 + temp1 + temp2,
            -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + ratio) * temp2,
            temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + ratio * (1 + h_n_2 / h_n_3)) * temp2,
            -temp2 * ratio * h_n_1 / h_n_2)


def ipndm_v_step(x, d_cur, history, sigma_window, order):
    """``x + h_n * sum(c_k * d_k)`` with the newest derivative first, as ComfyUI sums it."""
    if order == 1:
        return x + (sigma_window[-1] - sigma_window[-2]) * d_cur
    coeffs = ipndm_v_coefficients(sigma_window, order)
    total = coeffs[0] * d_cur
    for c, d in zip(coeffs[1:], reversed(history)):
        total = total + c * d
    return x + (sigma_window[-1] - sigma_window[-2]) * total


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d_cur = (x - denoised) / sigmas[i]
        order = min(max_order, i + 1)
        if sigmas[i + 1] == 0:
            x_next = denoised
        else:
            x_next = ipndm_v_step(x, d_cur, history, sigmas[i + 1 - order:i + 2], order)
        _push(history, d_cur, max_order - 1)
        x = x_next
    return x


# --- DEIS (time-AB, coefficients integrated on the VP time axis) --------------------------------

_EPS_S, _EDM_SIGMA_MIN, _EDM_SIGMA_MAX = 1e-3, 0.002, 80.0


def _vp_time_axis(sigmas: torch.Tensor):
    """EDM sigmas -> VP times t and the linear-VP (beta_0, beta_1) those EDM defaults imply."""
    log_min = torch.log(torch.tensor(_EDM_SIGMA_MIN) ** 2 + 1)
    log_max = torch.log(torch.tensor(_EDM_SIGMA_MAX) ** 2 + 1)
    beta_d = 2 * (log_min / _EPS_S - log_max) / (_EPS_S - 1)
    beta_min = log_max - 0.5 * beta_d
    sigmas = sigmas.detach().cpu()
    t = ((beta_min ** 2 + 2 * beta_d * (sigmas ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return t, beta_min, beta_d + beta_min


def deis_coefficients(sigmas: torch.Tensor, max_order: int = 3, n_points: int = 10000) -> list:
    """ComfyUI's 'tab' DEIS weights per step (empty for Euler steps), Riemann sums on n_points.

    The integrand is ``-0.5 * dlog(alpha)/dt / sqrt(alpha (1 - alpha))`` for the linear VP schedule,
    whose log-derivative ``-(t (beta_1 - beta_0) + beta_0)`` is written out instead of autograd.
    """
    t_steps, beta_0, beta_1 = _vp_time_axis(sigmas)
    coeffs = []
    for i in range(len(t_steps) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            coeffs.append([])
            continue
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        taus = torch.linspace(t_cur, t_next, n_points)
        dtau = (t_next - t_cur) / n_points
        alpha = torch.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
        d_log_alpha = -(taus * (beta_1 - beta_0) + beta_0)
        integrand = -0.5 * d_log_alpha / torch.sqrt(alpha * (1 - alpha))
        prev_t = t_steps[[i - k for k in range(order)]]
        row = []
        for j in range(order):
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * ((taus - prev_t[k]) / (prev_t[j] - prev_t[k]))
            row.append(torch.sum(integrand * poly) * dtau)
        coeffs.append(row)
    return coeffs


def deis_step(x, d_cur, history, sigma, sigma_next, coeffs):
    """Euler when no weights apply, else ``x + c_0 d_cur + c_1 d_prev1 + ...``."""
    if not coeffs:
        return x + (sigma_next - sigma) * d_cur
    x = x + coeffs[0] * d_cur
    for c, d in zip(coeffs[1:], reversed(history)):
        x = x + c * d
    return x


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    coeff_list = deis_coefficients(sigmas, max_order)
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d_cur = (x - denoised) / sigmas[i]
        coeffs = [] if sigmas[i + 1] <= 0 else coeff_list[i]
        x_next = deis_step(x, d_cur, history, sigmas[i], sigmas[i + 1], coeffs)
        _push(history, d_cur, max_order - 1)
        x = x_next
    return x


# --- Gradient estimation (Permenter & Yuan) -----------------------------------------------------

def gradient_estimation_step(x, denoised, d, old_d, sigma, sigma_next, ge_gamma=2.0, cfg_pp=False):
    """Euler step plus ``(gamma - 1) * (d - d_prev) * dt`` once a previous derivative exists."""
    dt = sigma_next - sigma
    if sigma_next == 0:
        return denoised
    x = denoised + d * sigma_next if cfg_pp else x + d * dt
    if old_d is not None:
        x = x + (ge_gamma - 1) * (d - old_d) * dt
    return x


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None,
                               ge_gamma=2.0, cfg_pp=False):
    capture = None
    if cfg_pp:
        extra_args, capture = with_uncond_capture(extra_args)
    elif extra_args is None:
        extra_args = {}
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], capture.uncond_denoised if cfg_pp else denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = gradient_estimation_step(x, denoised, d, old_d, sigmas[i], sigmas[i + 1], ge_gamma, cfg_pp)
        old_d = d
    return x


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                      ge_gamma=2.0):
    return sample_gradient_estimation(model, x, sigmas, extra_args, callback, disable, ge_gamma, cfg_pp=True)
