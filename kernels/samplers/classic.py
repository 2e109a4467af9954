"""The classic k-diffusion samplers as ComfyUI v0.3.64 runs them (``comfy/k_diffusion/sampling.py``).

euler, euler_ancestral, heun, heunpp2, dpm_2, dpm_2_ancestral, lms, ddpm, lcm.
Each loop calls the model and hands the tensor arithmetic to a ``*_step`` function (the twin of
a future fused kernel); the float operations are kept in ComfyUI's order for bit parity.
Noise comes from ``default_noise_sampler(x, extra_args["seed"])`` unless a sampler is given.
"""
from __future__ import annotations

import torch
from scipy import integrate

from ..noise import default_noise_sampler
from .common import get_ancestral_step, to_d


def _callback(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise):
    """Karras' optional noise increase before a step (s_churn > 0; KSampler never sets it)."""
    if s_churn <= 0:
        return x, sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        eps = torch.randn_like(x) * s_noise
        x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


# --- step functions ----------------------------------------------------------------------------

def euler_step(x, denoised, sigma, sigma_next):
    """One Euler step of the probability-flow ODE from ``sigma`` to ``sigma_next``."""
    d = to_d(x, sigma, denoised)
    return x + d * (sigma_next - sigma)


def euler_ancestral_step(x, denoised, sigma, sigma_down, sigma_up, noise, s_noise=1.0):
    """Euler down to ``sigma_down``, then add ``sigma_up`` worth of fresh noise."""
    d = to_d(x, sigma, denoised)
    return x + d * (sigma_down - sigma) + noise * s_noise * sigma_up


def heun_step(x, denoised, x_2, denoised_2, sigma, sigma_next):
    """Heun's corrector: average the slopes at both ends of the Euler predictor."""
    d = to_d(x, sigma, denoised)
    d_2 = to_d(x_2, sigma_next, denoised_2)
    return x + (d + d_2) / 2 * (sigma_next - sigma)


def heunpp2_step(x, ds, weights, sigma, sigma_next):
    """Heun++: slopes combined with sigma-proportional weights ``w1*d + w2*d_2 (+ w3*d_3)``."""
    if len(ds) == 2:
        d_prime = ds[0] * weights[0] + ds[1] * weights[1]
    else:
        d_prime = weights[0] * ds[0] + weights[1] * ds[1] + weights[2] * ds[2]
    return x + d_prime * (sigma_next - sigma)


def dpm_2_midpoint(sigma, sigma_next):
    """Geometric mean of the two sigmas (midpoint in log sigma)."""
    return sigma.log().lerp(sigma_next.log(), 0.5).exp()


def dpm_2_step(x, x_2, denoised_2, sigma, sigma_mid, sigma_next):
    """DPM-Solver-2: the full step taken with the slope at the log-midpoint."""
    d_2 = to_d(x_2, sigma_mid, denoised_2)
    return x + d_2 * (sigma_next - sigma)


def lms_coefficient(order, sigmas, i, j):
    """Integral over [sigma_i, sigma_i+1] of the j-th Lagrange basis polynomial (scipy quad, as ComfyUI)."""
    def basis(tau):
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod
    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]


def lms_step(x, ds, coeffs):
    """Linear multistep update; ``ds`` oldest first, ``coeffs`` newest first."""
    return x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))


def ddpm_step(x, denoised, sigma, sigma_next, noise):
    """DDPM ancestral step in variance-preserving space (``noise`` is None on the last step)."""
    x_vp = x / torch.sqrt(1.0 + sigma ** 2.0)
    eps = (x - denoised) / sigma
    alpha_cumprod = 1 / ((sigma * sigma) + 1)
    alpha_cumprod_prev = 1 / ((sigma_next * sigma_next) + 1)
    alpha = alpha_cumprod / alpha_cumprod_prev
    mu = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
    if sigma_next > 0:
        mu += ((1 - alpha) * (1. - alpha_cumprod_prev) / (1. - alpha_cumprod)).sqrt() * noise
    if sigma_next != 0:
        mu *= torch.sqrt(1.0 + sigma_next ** 2.0)
    return mu


def lcm_step(denoised, sigma_next, noise, model_sampling):
    """Jump to the prediction, then re-noise it to ``sigma_next`` (``noise`` is None at sigma 0)."""
    if sigma_next > 0:
        return model_sampling.noise_scaling(sigma_next, noise, denoised)
    return denoised


# --- samplers ----------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Karras et al. (2022) Algorithm 2 with Euler steps."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = euler_step(x, denoised, sigma_hat, sigmas[i + 1])
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    """Euler steps with ancestral re-noising; a step whose sigma_down is 0 returns the prediction."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _callback(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = denoised
        else:
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            x = euler_ancestral_step(x, denoised, sigmas[i], sigma_down, sigma_up, noise, s_noise)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Karras et al. (2022) Algorithm 2: Heun steps, Euler on the final step to sigma 0."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], sigma_hat, denoised)
        x_2 = euler_step(x, denoised, sigma_hat, sigmas[i + 1])
        if sigmas[i + 1] == 0:
            x = x_2
        else:
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            x = heun_step(x, denoised, x_2, denoised_2, sigma_hat, sigmas[i + 1])
    return x


@torch.no_grad()
def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None,
                   s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun++ (sd-webui-samplers-scheduler): up to three slope evaluations per step.

    Like ComfyUI it draws ``torch.randn_like(x)`` from the global generator every step even
    though the draw only matters when ``s_churn > 0``.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = torch.randn_like(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _callback(callback, x, i, sigmas[i], sigma_hat, denoised)
        x_2 = euler_step(x, denoised, sigma_hat, sigmas[i + 1])
        if sigmas[i + 1] == s_end:
            x = x_2
            continue
        denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
        d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
        if sigmas[i + 2] == s_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = heunpp2_step(x, (d, d_2), (1 - w2, w2), sigma_hat, sigmas[i + 1])
        else:
            x_3 = euler_step(x_2, denoised_2, sigmas[i + 1], sigmas[i + 2])
            denoised_3 = model(x_3, sigmas[i + 2] * s_in, **extra_args)
            d_3 = to_d(x_3, sigmas[i + 2], denoised_3)
            w = 3 * sigmas[0]
            w2 = sigmas[i + 1] / w
            w3 = sigmas[i + 2] / w
            x = heunpp2_step(x, (d, d_2, d_3), (1 - w2 - w3, w2, w3), sigma_hat, sigmas[i + 1])
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2-style midpoint steps (Karras Algorithm 2 variant); Euler to sigma 0."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = euler_step(x, denoised, sigma_hat, sigmas[i + 1])
        else:
            sigma_mid = dpm_2_midpoint(sigma_hat, sigmas[i + 1])
            x_2 = euler_step(x, denoised, sigma_hat, sigma_mid)
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            x = dpm_2_step(x, x_2, denoised_2, sigma_hat, sigma_mid, sigmas[i + 1])
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    """dpm_2 midpoint steps down to sigma_down, then ancestral noise up to sigma_next."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _callback(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = euler_step(x, denoised, sigmas[i], sigma_down)
        else:
            sigma_mid = dpm_2_midpoint(sigmas[i], sigma_down)
            x_2 = euler_step(x, denoised, sigmas[i], sigma_mid)
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            x = dpm_2_step(x, x_2, denoised_2, sigmas[i], sigma_mid, sigma_down)
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep; unlike upstream k-diffusion the step to sigma 0 returns the prediction."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        _callback(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            cur_order = min(i + 1, order)
            coeffs = [lms_coefficient(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
            x = lms_step(x, ds, coeffs)
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DDPM ancestral sampling expressed on k-diffusion sigmas."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], sigmas[i], denoised)
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if sigmas[i + 1] > 0 else None
        x = ddpm_step(x, denoised, sigmas[i], sigmas[i + 1], noise)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Latent-consistency sampling: predict x0, re-noise to the next sigma with fresh noise."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], sigmas[i], denoised)
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if sigmas[i + 1] > 0 else None
        x = lcm_step(denoised, sigmas[i + 1], noise, model.model_sampling)
    return x
