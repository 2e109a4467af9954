"""Classifier-free guidance: what a denoiser hands the samplers, and ComfyUI's combine.

A denoiser's ``predict(x, sigma, **extra_args)`` returns a :class:`Prediction`: the positive and
negative predictions for the step kernels to combine (``uncond + (cond - uncond) * scale``, as
ComfyUI's ``cfg_function``), or, where the combine already happened (a compiled plan's
denoiser; the inpainting blend of ``KSamplerX0Inpaint``), the combined prediction together with
the negative one the CFG++ samplers step on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def skips_uncond(cond_scale: float, need_uncond: bool = False) -> bool:
    """ComfyUI's cfg == 1 shortcut: the negative prompt is not evaluated at all, unless a sampler
    needs its prediction (the CFG++ samplers' ``disable_cfg1_optimization``)."""
    return math.isclose(cond_scale, 1.0) and not need_uncond


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``uncond + (cond - uncond) * scale`` in fp32; ``cond`` itself when there is no uncond."""
    cond = cond.float()
    if uncond is None:
        return cond
    uncond = uncond.float()
    return uncond + (cond - uncond) * scale


@dataclass(frozen=True)
class Prediction:
    """One denoiser evaluation as the samplers see it.

    ``combined`` False: ``cond`` and ``uncond`` are the raw predictions (``uncond`` None under the
    cfg == 1 shortcut). ``combined`` True: ``cond`` is already the guided prediction and ``uncond``
    (possibly None) is only there for the CFG++ samplers.
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None
    scale: float
    combined: bool = False

    @property
    def denoised(self) -> torch.Tensor:
        """The guided prediction, computed as the step kernels compute it."""
        if self.combined:
            return self.cond.float()
        return cfg_combine(self.cond, self.uncond, self.scale)


class Denoiser:
    """What every sampler drives: ``predict`` gives a :class:`Prediction`; calling the denoiser
    gives the guided prediction (the k-diffusion ``model(x, sigma, **extra_args)`` shape the
    samplers without step kernels use).

    ``predict`` receives the samplers' ``extra_args`` (``seed``, ``denoise_mask``) and
    ``need_uncond`` (a CFG++ sampler asks for the negative prediction even at cfg 1).
    """

    model_sampling = None

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, *, need_uncond: bool = False,
                **extra_args) -> Prediction:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        return self.predict(x, sigma, **extra_args).denoised
