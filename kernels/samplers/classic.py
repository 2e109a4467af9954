"""The classic k-diffusion samplers as ComfyUI v0.3.64 runs them (``comfy/k_diffusion/sampling.py``):
euler (also ddim), euler_ancestral, heun, heunpp2, dpm_2, dpm_2_ancestral, lms, ddpm, lcm.

Each step is one kernel (``kiln.kernels.fused``) fed with the scalars ComfyUI's loop computes,
in ComfyUI's float order; heunpp2 has no kernel and steps in torch. Noise comes from
``default_noise_sampler(x, extra_args["seed"])`` unless a sampler is given.
"""
from __future__ import annotations

import torch

from .common import to_d
from .stepper import Stepper

_NO_NOISE = (0.0, 0.0, 0.0)


def dpm_2_midpoint(sigma, sigma_next):
    """Geometric mean of the two sigmas (midpoint in log sigma)."""
    return sigma.log().lerp(sigma_next.log(), 0.5).exp()


def lms_coefficient(order, sigmas, i, j):
    """Integral over [sigma_i, sigma_i+1] of the j-th Lagrange basis polynomial (scipy quad, as ComfyUI)."""
    from scipy import integrate  # imported when lms needs it: scipy adds a second to every start

    def basis(tau):
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod
    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Karras et al. (2022) Algorithm 2 with Euler steps (KSampler never sets s_churn)."""
    run = Stepper(model, x, sigmas, extra_args, callback)
    for i, s, sn in run.steps():
        out, den = run("euler", (s, sn - s, *_NO_NOISE), run.predict(x, s), x=x, store=run.den_store)
        x = run.done(i, x, out, den)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    """Euler steps with ancestral re-noising; a step whose sigma_down is 0 returns the prediction."""
    run = Stepper(model, x, sigmas, extra_args, callback, noise_sampler=noise_sampler)
    for i, s, sn, sigma_down, sigma_up in run.ancestral_steps(eta):
        prediction = run.predict(x, s)
        if sigma_down == 0:
            out, den = run("denoised", _NO_NOISE, prediction, x=x, store=run.den_store)
        else:
            out, den = run("euler", (s, sigma_down - s, s_noise, sigma_up, 1.0), prediction, x=x, noise=run.noise(i),
                           store=run.den_store)
        x = run.done(i, x, out, den)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Karras et al. (2022) Algorithm 2: Heun steps, Euler on the final step to sigma 0."""
    run = Stepper(model, x, sigmas, extra_args, callback)
    for i, s, sn in run.steps():
        x_2, den = run("euler", (s, sn - s, *_NO_NOISE), run.predict(x, s), x=x, store=("den",))
        out = x_2 if sn == 0 else run("heun", (s, sn, sn - s), run.predict(x_2, sn), x=x, x2=x_2, den1=den)[0]
        x = run.done(i, x, out, den)
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

    def euler(x, denoised, sigma, sigma_next):
        return x + to_d(x, sigma, denoised) * (sigma_next - sigma)

    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = torch.randn_like(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x_2 = euler(x, denoised, sigma_hat, sigmas[i + 1])
        if sigmas[i + 1] == s_end:
            x = x_2
            continue
        denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
        d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 2] == s_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_3 = euler(x_2, denoised_2, sigmas[i + 1], sigmas[i + 2])
            denoised_3 = model(x_3, sigmas[i + 2] * s_in, **extra_args)
            d_3 = to_d(x_3, sigmas[i + 2], denoised_3)
            w = 3 * sigmas[0]
            w2 = sigmas[i + 1] / w
            w3 = sigmas[i + 2] / w
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def _dpm_2_step(run, x, prediction, s, sigma_to, noise=None, noise_row=_NO_NOISE):
    """Midpoint step from s to sigma_to (two model calls); returns (x, first denoised or None)."""
    sigma_mid = dpm_2_midpoint(s, sigma_to)
    x_2, den = run("euler", (s, sigma_mid - s, *_NO_NOISE), prediction, x=x, store=run.den_store)
    out = run("euler", (sigma_mid, sigma_to - s, *noise_row), run.predict(x_2, sigma_mid), x=x, y=x_2,
              noise=noise)[0]
    return out, den


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver-2-style midpoint steps (Karras Algorithm 2 variant); Euler to sigma 0."""
    run = Stepper(model, x, sigmas, extra_args, callback)
    for i, s, sn in run.steps():
        prediction = run.predict(x, s)
        if sn == 0:
            out, den = run("euler", (s, sn - s, *_NO_NOISE), prediction, x=x, store=run.den_store)
        else:
            out, den = _dpm_2_step(run, x, prediction, s, sn)
        x = run.done(i, x, out, den)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    """dpm_2 midpoint steps down to sigma_down, then ancestral noise up to sigma_next."""
    run = Stepper(model, x, sigmas, extra_args, callback, noise_sampler=noise_sampler)
    for i, s, sn, sigma_down, sigma_up in run.ancestral_steps(eta):
        prediction = run.predict(x, s)
        if sigma_down == 0:
            out, den = run("euler", (s, sigma_down - s, *_NO_NOISE), prediction, x=x, store=run.den_store)
        else:
            # ComfyUI draws after both model calls; the model draws nothing, so the order holds
            out, den = _dpm_2_step(run, x, prediction, s, sigma_down, run.noise(i), (s_noise, sigma_up, 1.0))
        x = run.done(i, x, out, den)
    return x


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep; unlike upstream k-diffusion the step to sigma 0 returns the prediction."""
    if not 1 <= order <= 4:
        raise ValueError(f"lms supports order 1-4, got {order}")
    run = Stepper(model, x, sigmas, extra_args, callback)
    sigmas_np = sigmas.detach().cpu().numpy()
    ds: list[torch.Tensor] = []   # derivatives, oldest first
    for i, s, sn in run.steps():
        prediction = run.predict(x, s)
        if sn == 0:
            out, den = run("denoised", _NO_NOISE, prediction, x=x, store=run.den_store)
        else:
            cur_order = min(i + 1, order)
            coeffs = [lms_coefficient(cur_order, sigmas_np, i, j) for j in range(cur_order)]
            coeffs += [0.0] * (order - cur_order)
            history = dict(zip(("h1", "h2", "h3"), reversed(ds[len(ds) - cur_order + 1:])))
            out, d, den = run("multistep", (s, 1.0, 1.0, *coeffs), prediction, x=x, sequential=0,
                              store=("d",) + run.den_store, **history)
            ds.append(d)
            del ds[:max(0, len(ds) - (order - 1))]
        x = run.done(i, x, out, den)
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DDPM ancestral sampling expressed on k-diffusion sigmas (variance-preserving space)."""
    run = Stepper(model, x, sigmas, extra_args, callback, noise_sampler=noise_sampler)
    for i, s, sn in run.steps():
        prediction = run.predict(x, s)
        noise = run.noise(i) if sn > 0 else None
        alpha_cumprod = 1 / ((s * s) + 1)
        alpha_cumprod_prev = 1 / ((sn * sn) + 1)
        alpha = alpha_cumprod / alpha_cumprod_prev
        row = (torch.sqrt(1.0 + s ** 2.0), s, (1.0 / alpha).sqrt(), 1 - alpha, (1 - alpha_cumprod).sqrt(),
               ((1 - alpha) * (1. - alpha_cumprod_prev) / (1. - alpha_cumprod)).sqrt(), 1.0, 1.0,
               torch.sqrt(1.0 + sn ** 2.0))
        out, den = run("ddpm", row, prediction, x=x, noise=noise, rescale=int(sn != 0), store=run.den_store)
        x = run.done(i, x, out, den)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Latent-consistency sampling: predict x0, re-noise to the next sigma with fresh noise."""
    run = Stepper(model, x, sigmas, extra_args, callback, noise_sampler=noise_sampler)
    for i, s, sn in run.steps():
        prediction = run.predict(x, s)
        noise = run.noise(i) if sn > 0 else None
        # eps/v noise_scaling: noise * sigma_next + denoised
        out, den = run("denoised", (sn, 1.0, 1.0), prediction, x=x, noise=noise, store=run.den_store)
        x = run.done(i, x, out, den)
    return x
