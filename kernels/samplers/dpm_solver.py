"""DPM-Solver fast / adaptive (arXiv 2206.00927) as ComfyUI v0.3.64 runs them.

The solver works in t = -log(sigma) and only uses the ends of the schedule. ComfyUI's
``comfy/samplers.py: ksampler`` wraps them: sigma_max = sigmas[0], sigma_min = sigmas[-1]
(or sigmas[-2] when the last is 0), and dpm_fast spends ``len(sigmas) - 1`` model calls.
``sample_dpm_fast`` / ``sample_dpm_adaptive`` are those wrappers (the registry signature);
``dpm_solver_fast`` / ``dpm_solver_adaptive`` take sigma_min / sigma_max directly.
"""
from __future__ import annotations

import math

import torch

from ..noise import default_noise_sampler
from .common import get_ancestral_step


def _t(sigma):
    return -sigma.log()


def _sigma(t):
    return t.neg().exp()


# --- step functions (eps = noise prediction at the stage's t) ------------------------------------

def dpm_solver_1_step(x, eps, t, t_next):
    """First order (DDIM) update."""
    h = t_next - t
    return x - _sigma(t_next) * h.expm1() * eps


def dpm_solver_2_stage(x, eps, t, t_next, r1):
    """The intermediate point (s1, u1) of the second-order update."""
    h = t_next - t
    s1 = t + r1 * h
    return s1, x - _sigma(s1) * (r1 * h).expm1() * eps


def dpm_solver_2_step(x, eps, eps_r1, t, t_next, r1):
    h = t_next - t
    return (x - _sigma(t_next) * h.expm1() * eps
            - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps))


def dpm_solver_3_stage2(x, eps, eps_r1, t, t_next, r1, r2):
    """The second intermediate point (s2, u2) of the third-order update."""
    h = t_next - t
    s2 = t + r2 * h
    u2 = (x - _sigma(s2) * (r2 * h).expm1() * eps
          - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
    return s2, u2


def dpm_solver_3_step(x, eps, eps_r2, t, t_next, r2):
    h = t_next - t
    return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


class _Solver:
    """Model evaluations in eps form plus the order-1/2/3 updates, each stage evaluated once."""

    def __init__(self, model, extra_args):
        self.model = model
        self.extra_args = extra_args

    def eps(self, x, t):
        sigma = _sigma(t) * x.new_ones([x.shape[0]])
        return (x - self.model(x, sigma, **self.extra_args)) / _sigma(t)

    def order_1(self, x, t, t_next, eps):
        return dpm_solver_1_step(x, eps, t, t_next)

    def order_2(self, x, t, t_next, eps, r1=1 / 2):
        s1, u1 = dpm_solver_2_stage(x, eps, t, t_next, r1)
        return dpm_solver_2_step(x, eps, self.eps(u1, s1), t, t_next, r1)

    def order_3(self, x, t, t_next, eps, r1=1 / 3, r2=2 / 3):
        s1, u1 = dpm_solver_2_stage(x, eps, t, t_next, r1)
        eps_r1 = self.eps(u1, s1)
        s2, u2 = dpm_solver_3_stage2(x, eps, eps_r1, t, t_next, r1, r2)
        return dpm_solver_3_step(x, eps, self.eps(u2, s2), t, t_next, r2)

    def order_2_and_3(self, x, t, t_next, eps):
        """dpm_adaptive's embedded pair: order 2 (r1 = 1/3) and order 3 sharing the first stage."""
        s1, u1 = dpm_solver_2_stage(x, eps, t, t_next, 1 / 3)
        eps_r1 = self.eps(u1, s1)
        x_low = dpm_solver_2_step(x, eps, eps_r1, t, t_next, 1 / 3)
        s2, u2 = dpm_solver_3_stage2(x, eps, eps_r1, t, t_next, 1 / 3, 2 / 3)
        x_high = dpm_solver_3_step(x, eps, self.eps(u2, s2), t, t_next, 2 / 3)
        return x_low, x_high

    def order_1_and_2(self, x, t, t_next, eps):
        """The order-2 adaptive pair: DDIM and midpoint order 2."""
        return self.order_1(x, t, t_next, eps), self.order_2(x, t, t_next, eps)


def _ancestral_target(t, t_next, t_end, eta):
    """(t the deterministic part stops at, sigma_up of the added noise); no noise when eta = 0."""
    if not eta:
        return t_next, 0.0
    sd, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = torch.minimum(t_end, _t(sd))
    return t_next_, (_sigma(t_next) ** 2 - _sigma(t_next_) ** 2) ** 0.5


def _info_callback(callback, info):
    if callback is not None:
        callback({"sigma": _sigma(info["t"]), "sigma_hat": _sigma(info["t_up"]), **info})


@torch.no_grad()
def dpm_solver_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None,
                    eta=0.0, s_noise=1.0, noise_sampler=None):
    """Fixed steps uniform in t with orders 3,3,...,(2,1 | n mod 3) so that exactly n model calls are made."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    solver = _Solver(model, extra_args)
    t_start, t_end = _t(torch.as_tensor(sigma_max).clone()), _t(torch.as_tensor(sigma_min).clone())
    if not t_end > t_start and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = _ancestral_target(t, t_next, t_end, eta)
        eps = solver.eps(x, t)
        _info_callback(callback, {"x": x, "i": i, "t": ts[i], "t_up": t, "denoised": x - _sigma(t) * eps})
        step = (solver.order_1, solver.order_2, solver.order_3)[order - 1]
        x = step(x, t, t_next_, eps)
        x = x + su * s_noise * noise_sampler(_sigma(t), _sigma(t_next))
    return x


class PIDStepSizeController:
    """PID control of the step size h from the embedded error estimate."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = []

    @staticmethod
    def limiter(x):
        return 1 + math.atan(x - 1)

    def propose_step(self, error) -> bool:
        """Rescale h; True if the step that produced ``error`` is accepted."""
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.limiter(self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def dpm_solver_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None,
                        order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False):
    """Adaptive step size from the difference of an embedded order (order-1, order) pair."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    if order not in {2, 3}:
        raise ValueError("order should be 2 or 3")
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    solver = _Solver(model, extra_args)
    t_start, t_end = _t(torch.as_tensor(sigma_max).clone()), _t(torch.as_tensor(sigma_min).clone())
    forward = t_end > t_start
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    h_init = abs(h_init) * (1 if forward else -1)
    atol, rtol = torch.tensor(atol), torch.tensor(rtol)
    s = t_start
    x_prev = x
    pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    pair = solver.order_1_and_2 if order == 2 else solver.order_2_and_3
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
        t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
        t_, su = _ancestral_target(s, t, t_end, eta)
        eps = solver.eps(x, s)
        denoised = x - _sigma(s) * eps
        x_low, x_high = pair(x, s, t_, eps)
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + su * s_noise * noise_sampler(_sigma(s), _sigma(t))
            s = t
            info["n_accept"] += 1
        else:
            info["n_reject"] += 1
        info["nfe"] += order
        info["steps"] += 1
        _info_callback(callback, {"x": x, "i": info["steps"] - 1, "t": s, "t_up": s, "denoised": denoised,
                                  "error": error, "h": pid.h, **info})
    return (x, info) if return_info else x


def _sigma_range(sigmas):
    """ComfyUI's wrapper: the solver runs from sigmas[0] to the last non-zero sigma."""
    sigma_min = sigmas[-1]
    if sigma_min == 0:
        sigma_min = sigmas[-2]
    return sigma_min, sigmas[0]


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback=None, disable=None,
                    eta=0.0, s_noise=1.0, noise_sampler=None):
    """dpm_fast with the registry signature (``len(sigmas) - 1`` model calls)."""
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = _sigma_range(sigmas)
    return dpm_solver_fast(model, x, sigma_min, sigma_max, len(sigmas) - 1, extra_args, callback, disable,
                           eta=eta, s_noise=s_noise, noise_sampler=noise_sampler)


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """dpm_adaptive with the registry signature (only the schedule's ends are used)."""
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = _sigma_range(sigmas)
    return dpm_solver_adaptive(model, x, sigma_min, sigma_max, extra_args, callback, disable, **options)
