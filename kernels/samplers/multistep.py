"""Linear multistep samplers from ComfyUI: iPNDM, iPNDM-v, DEIS and gradient estimation.

iPNDM/iPNDM-v/DEIS follow zju-pi/diff-sampler as ComfyUI vendors it: Adams-Bashforth steps in
sigma on the Karras derivative ``d = (x - denoised) / sigma``, warming up from Euler, and jumping
straight to ``denoised`` (or an Euler step, for DEIS) on the step to sigma = 0. Each step is one
``multistep`` kernel with the derivative history (newest last) kept as the tensors it stores;
gradient estimation has no kernel and steps in torch.
"""
from __future__ import annotations

import torch

from .common import to_d
from .stepper import Stepper

_NO_NOISE = (0.0, 0.0, 0.0)
# iPNDM's equal-step Adams-Bashforth weights (newest first) and divisors per order.
_IPNDM = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


def _history(history: list, count: int) -> dict:
    """The newest ``count`` stored derivatives as the kernel's h1 (newest), h2, h3."""
    return dict(zip(("h1", "h2", "h3"), reversed(history[len(history) - count:])))


def _multistep_loop(model, x, sigmas, extra_args, callback, max_order, plan):
    """Shared loop; ``plan(sig, i, order)`` gives (row, history count, sequential) or None for x = denoised."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"multistep samplers support orders 1-4, got {max_order}")
    run = Stepper(model, x, sigmas, extra_args, callback)
    history: list[torch.Tensor] = []
    for i, s, _ in run.steps():
        prediction = run.predict(x, s)
        step = plan(run.sig, i, min(max_order, i + 1))
        if step is None:
            out, den = run("denoised", _NO_NOISE, prediction, x=x, store=run.den_store)
        else:
            row, count, sequential = step
            row = tuple(row) + (0.0,) * (7 - len(row))
            out, d, den = run("multistep", row, prediction, x=x, sequential=sequential,
                              store=("d",) + run.den_store, **_history(history, count))
            history.append(d)
            del history[:max(0, len(history) - (max_order - 1))]
        x = run.done(i, x, out, den)
    return x


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """Adams-Bashforth of order 1-4 with equal-step coefficients."""
    def plan(sig, i, order):
        if sig[i + 1] == 0:
            return None
        weights, div = _IPNDM[order]
        return (sig[i], sig[i + 1] - sig[i], div, *weights), order - 1, 0
    return _multistep_loop(model, x, sigmas, extra_args, callback, max_order, plan)


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


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """Adams-Bashforth with variable-step coefficients, ``x + h_n * sum(c_k * d_k)``."""
    def plan(sig, i, order):
        if sig[i + 1] == 0:
            return None
        window = sig[i + 1 - order:i + 2]
        weights = (1.0,) if order == 1 else ipndm_v_coefficients(window, order)
        return (sig[i], window[-1] - window[-2], 1.0, *weights), order - 1, 0
    return _multistep_loop(model, x, sigmas, extra_args, callback, max_order, plan)


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


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3):
    """Euler where no weights apply, else ``x + c_0 d_cur + c_1 d_prev1 + ...``."""
    coeff_list = deis_coefficients(sigmas, max_order)

    def plan(sig, i, order):
        coeffs = [] if sig[i + 1] <= 0 else coeff_list[i]
        if not coeffs:   # Euler
            return (sig[i], sig[i + 1] - sig[i], 1.0, 1.0), 0, 0
        return (sig[i], 1.0, 1.0, *coeffs), len(coeffs) - 1, 1
    return _multistep_loop(model, x, sigmas, extra_args, callback, max_order, plan)


# --- Gradient estimation (Permenter & Yuan) -----------------------------------------------------

@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None,
                               ge_gamma=2.0, cfg_pp=False):
    """Euler step plus ``(gamma - 1) * (d - d_prev) * dt`` once a previous derivative exists; the
    CFG++ flavour takes d from the uncond prediction and steps from the guided one."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    for i in range(len(sigmas) - 1):
        prediction = model.predict(x, sigmas[i] * s_in, need_uncond=cfg_pp, **extra_args)
        denoised = prediction.denoised
        d = to_d(x, sigmas[i], prediction.uncond if cfg_pp else denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x
