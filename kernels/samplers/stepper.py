"""What every sampler loop with step kernels shares: model calls, coefficient rows, kernel calls.

A loop asks the denoiser for a :class:`kiln.kernels.cfg.Prediction` and hands it with one row of
host-computed coefficients to a kernel family (``kiln.kernels.fused``), which forms the CFG
combine and the update in one pass. Coefficients come from a CPU copy of the sigmas with
ComfyUI's scalar operations, so the torch twins reproduce ComfyUI's samplers bit for bit; noise is
drawn by the same noise samplers in the same order.
"""
from __future__ import annotations

import torch

from kiln.kernels.cfg import Denoiser, Prediction
from kiln.kernels.fused.dispatch import DEFAULT_MODE, step
from kiln.kernels.fused.families import FAMILIES
from kiln.kernels.noise import NoiseSampler, default_noise_sampler
from kiln.kernels.samplers.common import get_ancestral_step

# extra_args key of the step-kernel mode (kiln.kernels.fused.dispatch); never passed to the model.
STEP_MODE = "step_mode"


class Stepper:
    """Per-run state of a sampler loop: the denoiser, the sigmas (``sigmas`` on the device, ``sig``
    on the host), the kernel mode, the noise sampler and the callback. A loop reads::

        run = Stepper(model, x, sigmas, extra_args, callback)
        for i, s, sn in run.steps():
            prediction = run.predict(x, s)
            out, den = run("euler", (s, sn - s, ...), prediction, x=x, store=run.den_store)
            x = run.done(i, x, out, den)
    """

    def __init__(self, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None,
                 callback=None, *, need_uncond: bool = False, noise_sampler: NoiseSampler | None = None):
        extra_args = {} if extra_args is None else dict(extra_args)
        self.mode = extra_args.pop(STEP_MODE, DEFAULT_MODE)
        self.model, self.extra_args, self.callback = model, extra_args, callback
        self.need_uncond = need_uncond
        self.device = x.device
        self.sigmas = sigmas
        self.sig = sigmas.detach().to("cpu", torch.float32)
        self.s_in = x.new_ones([x.shape[0]])
        self._like = x
        self._noise_sampler = noise_sampler

    def steps(self):
        """``(i, sigma_i, sigma_i+1)`` per step, the sigmas as host scalars."""
        for i in range(len(self.sig) - 1):
            yield i, self.sig[i], self.sig[i + 1]

    @property
    def noise_sampler(self) -> NoiseSampler:
        """The given noise sampler, else ComfyUI's default one seeded with ``extra_args["seed"]``."""
        if self._noise_sampler is None:
            self._noise_sampler = default_noise_sampler(self._like, seed=self.extra_args.get("seed"))
        return self._noise_sampler

    def noise(self, i: int) -> torch.Tensor:
        """The noise drawn for step ``i`` (sigma_i -> sigma_i+1)."""
        return self.noise_sampler(self.sigmas[i], self.sigmas[i + 1])

    def ancestral_steps(self, eta: float):
        """``steps()`` with each step split into a deterministic part down to ``sigma_down`` and
        fresh noise ``sigma_up``: ``(i, sigma_i, sigma_i+1, sigma_down, sigma_up)``."""
        for i, s, sn in self.steps():
            yield (i, s, sn, *get_ancestral_step(s, sn, eta=eta))

    @property
    def den_store(self) -> tuple:
        """Ask kernels for ``den`` only when the callback will report it."""
        return ("den",) if self.callback is not None else ()

    def dev(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self.device)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor) -> Prediction:
        return self.model.predict(x, self.dev(sigma) * self.s_in, need_uncond=self.need_uncond, **self.extra_args)

    def __call__(self, family: str, row, prediction: Prediction, store=(), **kwargs) -> tuple:
        """One step of ``family`` on ``prediction``; outputs in family order (None where not written)."""
        coef = torch.tensor([float(v) for v in row], dtype=torch.float32).to(self.device)
        switches = FAMILIES[family].switches
        uncond = prediction.uncond
        if "combined" in switches:   # a family that reads the uncond prediction itself (CFG++)
            kwargs["combined"] = int(prediction.combined)
        elif prediction.combined:
            uncond = None
        return step(family, coef, prediction.scale, step_mode=self.mode, store=store, cond=prediction.cond,
                    uncond=uncond, **kwargs)

    def done(self, i: int, x: torch.Tensor, out: torch.Tensor, denoised: torch.Tensor | None) -> torch.Tensor:
        """Report step ``i`` (the state it started from and its prediction); returns the new state."""
        if self.callback is not None:
            sigma = self.sigmas[i]
            self.callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        return out
