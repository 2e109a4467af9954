"""What the fused sampler loops share: the split denoiser they drive and a step runner.

A fused loop does what the eager sampler in ``kiln.kernels.samplers`` does, but the model hands
back cond and uncond predictions *separately* and one kernel per step forms the CFG combine and
the update. Coefficients are computed on the host from a CPU copy of the sigmas with the eager
code's scalar operations (so the twin path is bit-identical to the eager samplers on CPU) and
shipped as one small fp32 row per kernel call; noise is drawn by the same noise samplers in the
same order as the eager loops.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from .dispatch import step


class SplitDenoiser(Protocol):
    """A guider that returns the two predictions instead of combining them.

    ``predict(x, sigma, **extra_args) -> (cond, uncond)``; ``uncond`` is None when ComfyUI's
    cfg == 1 shortcut skips it (``kiln.kernels.cfg.skips_uncond`` on ``extra_args["model_options"]``).
    """
    cfg: float
    model_sampling: Any

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> tuple: ...


# model_options entries the fused combine cannot honour (arbitrary Python on the predictions).
UNFUSABLE_OPTIONS = ("sampler_cfg_function", "sampler_post_cfg_function")


def fusable_options(model_options: dict | None) -> bool:
    """False when ``model_options`` carries CFG hooks; such runs must use the eager samplers."""
    return not any((model_options or {}).get(key) for key in UNFUSABLE_OPTIONS)


class Stepper:
    """Per-run state of a fused loop: model calls, coefficient upload, kernel calls, callback."""

    def __init__(self, model: SplitDenoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None,
                 callback=None, need_uncond: bool = False):
        extra_args = {} if extra_args is None else dict(extra_args)
        model_options = dict(extra_args.get("model_options") or {})
        if not fusable_options(model_options):
            raise ValueError(f"fused samplers cannot run CFG hooks {UNFUSABLE_OPTIONS}; use the eager sampler")
        if need_uncond:   # the CFG++ samplers' disable_cfg1_optimization
            model_options["disable_cfg1_optimization"] = True
        extra_args["model_options"] = model_options
        self.model, self.extra_args, self.callback = model, extra_args, callback
        self.scale = float(model.cfg)
        self.device = x.device
        self.sigmas = sigmas
        self.sig = sigmas.detach().to("cpu", torch.float32)
        self.s_in = x.new_ones([x.shape[0]])

    @property
    def den_store(self) -> tuple:
        """Ask kernels for ``den`` only when the callback will report it."""
        return ("den",) if self.callback is not None else ()

    def dev(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self.device)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple:
        return self.model.predict(x, self.dev(sigma) * self.s_in, **self.extra_args)

    def __call__(self, family: str, row, store=(), **kwargs) -> tuple:
        coef = torch.tensor([float(v) for v in row], dtype=torch.float32).to(self.device)
        return step(family, coef, self.scale, store=store, **kwargs)

    def report(self, x, i, sigma, denoised) -> None:
        if self.callback is not None:
            self.callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
