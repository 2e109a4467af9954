"""SA-Solver (ComfyUI ``sa_solver``/``sa_solver_pece``; Xue et al., NeurIPS 2023, arXiv:2309.05019).

Stochastic Adams predictor-corrector in data prediction and half-log-SNR time. The Adams weights
integrate the Lagrange basis through the past ``lambda`` points against the SDE's exponential
kernel; ``tau`` (stochasticity) is 1 inside ComfyUI's default sigma window, 0 outside it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from kiln.kernels.noise import default_noise_sampler


def exponential_coeffs(s: torch.Tensor, t: torch.Tensor, order: int, tau: float) -> torch.Tensor:
    """(1 + tau^2) * int_s^t exp((1 + tau^2)(x - t)) x^p dx for p < order (integration by parts)."""
    tau_mul = 1 + tau ** 2
    h = t - s
    p = torch.arange(order, dtype=s.dtype, device=s.device)
    product_terms = t ** p - s ** p * (-tau_mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    log_coeff = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau > 0:
        log_coeff = log_coeff - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (log_coeff.exp() * signs).tril() @ product_terms


def simple_order2_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau, is_corrector_step):
    """The paper's simplified order-2 weights (Appendix D), oldest point first."""
    tau_mul = 1 + tau ** 2
    h = lambda_t - lambda_s
    alpha_t = sigma_next * lambda_t.exp()
    if is_corrector_step:
        b_1 = alpha_t * (0.5 * tau_mul * h)
        b_2 = alpha_t * (-h * tau_mul).expm1().neg() - b_1
    else:
        b_2 = alpha_t * (0.5 * tau_mul * h ** 2) / (curr_lambdas[-2] - lambda_s)
        b_1 = alpha_t * (-h * tau_mul).expm1().neg() - b_2
    return torch.stack([b_2, b_1])


def stochastic_adams_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau, simple_order_2=False,
                              is_corrector_step=False) -> torch.Tensor:
    """Weights b_i for the predictions at ``curr_lambdas`` (its length is the order)."""
    order = curr_lambdas.shape[0]
    if simple_order_2 and order == 2:
        return simple_order2_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau, is_corrector_step)
    integrals = exponential_coeffs(lambda_s, lambda_t, order, tau)
    vandermonde_t = torch.vander(curr_lambdas, order, increasing=True).T
    lagrange_integrals = torch.linalg.solve(vandermonde_t, integrals)
    # sigma_t * exp(-tau^2 lambda_t) * exp((1 + tau^2) lambda_t) = alpha_t
    return sigma_next * lambda_t.exp() * lagrange_integrals


def tau_interval_func(start_sigma: float, end_sigma: float, eta: float = 1.0) -> Callable:
    """tau = eta for sigmas in [end_sigma, start_sigma], else 0 (ODE)."""
    def tau_func(sigma) -> float:
        if eta <= 0:
            return 0.0
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.item()
        return eta if start_sigma >= sigma >= end_sigma else 0.0
    return tau_func


def _adams_sum(preds: list, b_coeffs: torch.Tensor) -> torch.Tensor:
    return torch.tensordot(torch.stack(preds, dim=1), b_coeffs, dims=([1], [0]))


def sa_corrector_step(x, preds, b_coeffs, sigma, sigma_prev, tau, h, noise):
    """Corrector: recompute the step from ``sigma_prev`` including the newest prediction.

    ``noise`` is the previous predictor's noise term (reused, not redrawn) or None.
    """
    x = sigma / sigma_prev * (-(tau ** 2) * h).exp() * x + _adams_sum(preds, b_coeffs)
    return x if noise is None else x + noise


def sa_predictor_step(x, preds, b_coeffs, sigma, sigma_next, tau, h, noise=None, s_noise=1.0):
    """Predictor to ``sigma_next``; returns (x_pred, its noise term or None)."""
    x_pred = sigma_next / sigma * (-(tau ** 2) * h).exp() * x + _adams_sum(preds, b_coeffs)
    if noise is None:
        return x_pred, None
    noise = noise * sigma_next * (-2 * tau ** 2 * h).expm1().neg().sqrt() * s_noise
    return x_pred + noise, noise


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=False, tau_func=None,
                     s_noise=1.0, noise_sampler=None, predictor_order=3, corrector_order=4, use_pece=False,
                     simple_order_2=False):
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    model_sampling = model.model_sampling
    sigmas = model_sampling.offset_first_sigma_for_snr(sigmas)
    lambdas = model_sampling.sigma_to_half_log_snr(sigmas)
    if tau_func is None:
        tau_func = tau_interval_func(model_sampling.percent_to_sigma(0.2), model_sampling.percent_to_sigma(0.8))

    max_used_order = max(predictor_order, corrector_order)
    x_pred = x
    h, tau_t, noise = 0.0, 0.0, None
    pred_list: list[torch.Tensor] = []
    lower_order_to_end = sigmas[-1].item() == 0  # lower the order near the end for stability

    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x_pred, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        pred_list.append(denoised)
        pred_list = pred_list[-max_used_order:]

        predictor_order_used = min(predictor_order, len(pred_list))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_order_used = 0
        else:
            corrector_order_used = min(corrector_order, len(pred_list))
        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, len(sigmas) - 2 - i)
            corrector_order_used = min(corrector_order_used, len(sigmas) - 1 - i)

        if corrector_order_used == 0:
            x = x_pred
        else:
            b_coeffs = stochastic_adams_b_coeffs(sigmas[i], lambdas[i - corrector_order_used + 1:i + 1],
                                                 lambdas[i - 1], lambdas[i], tau_t, simple_order_2,
                                                 is_corrector_step=True)
            x = sa_corrector_step(x, pred_list[-corrector_order_used:], b_coeffs, sigmas[i], sigmas[i - 1],
                                  tau_t, h, noise if tau_t > 0 and s_noise > 0 else None)
            if use_pece:
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                pred_list[-1] = denoised

        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            b_coeffs = stochastic_adams_b_coeffs(sigmas[i + 1], lambdas[i - predictor_order_used + 1:i + 1],
                                                 lambdas[i], lambdas[i + 1], tau_t, simple_order_2,
                                                 is_corrector_step=False)
            h = lambdas[i + 1] - lambdas[i]
            draw = noise_sampler(sigmas[i], sigmas[i + 1]) if tau_t > 0 and s_noise > 0 else None
            x_pred, step_noise = sa_predictor_step(x, pred_list[-predictor_order_used:], b_coeffs, sigmas[i],
                                                   sigmas[i + 1], tau_t, h, draw, s_noise)
            if step_noise is not None:
                noise = step_noise
    return x_pred
