"""Classifier-free guidance combine, in denoised (x0) space as ComfyUI's ``cfg_function``."""
from __future__ import annotations

import math

import torch


def skips_uncond(cond_scale: float, model_options: dict) -> bool:
    """ComfyUI's cfg == 1 shortcut: the negative prompt is not evaluated at all."""
    return math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)


def cfg_function(cond_pred: torch.Tensor, uncond_pred: torch.Tensor, cond_scale: float,
                 x: torch.Tensor, sigma: torch.Tensor, model_options: dict) -> torch.Tensor:
    """``uncond + (cond - uncond) * scale``, then every ``sampler_post_cfg_function`` hook in order.

    Hooks (added by the ``*_cfg_pp`` samplers) receive ComfyUI's argument names.
    """
    fn = model_options.get("sampler_cfg_function")
    if fn is not None:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale,
                "timestep": sigma, "input": x, "sigma": sigma,
                "cond_denoised": cond_pred, "uncond_denoised": uncond_pred, "model_options": model_options}
        cfg_result = x - fn(args)
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for hook in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "sigma": sigma, "model_options": model_options, "input": x}
        cfg_result = hook(args)
    return cfg_result
