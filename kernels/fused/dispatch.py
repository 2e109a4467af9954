"""Run one sampler step: the Triton kernel on CUDA, its torch twin elsewhere.

The mode is a setting passed down explicitly (``kiln.kernels.settings.Settings.step_kernels``):

* ``auto``: CUDA tensors go through ``torch.ops.kiln.fused_*`` (the Triton kernel, visible to
  torch.export), everything else through the twin. Triton is imported only when a CUDA step runs.
* ``off``: always the twin, i.e. eager torch with the same arithmetic.
* ``triton``: always launch the Triton kernel directly, whatever the device; on CPU this works
  only under ``TRITON_INTERPRET=1`` (the tests' interpret mode).
* ``check``: launch the Triton kernel *and* run the twin, fail on any difference beyond the
  kernel's rounding (``StepMismatch``) and return the kernel's result: the CUDA-only path's check.
"""
from __future__ import annotations

import torch

from .families import FAMILIES, call_twin

MODES = ("auto", "off", "triton", "check")
DEFAULT_MODE = "auto"


class StepMismatch(AssertionError):
    """A Triton step kernel disagreed with its torch twin (``check`` mode)."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"step kernel mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def triton_available() -> bool:
    from .ops import TRITON_AVAILABLE

    return TRITON_AVAILABLE


def backend(x: torch.Tensor, mode: str = DEFAULT_MODE) -> str:
    """``op`` (torch.library Triton op), ``triton`` (direct launch), ``check`` or ``twin``."""
    check_mode(mode)
    if mode == "off" or (mode == "auto" and not x.is_cuda):
        return "twin"
    if not triton_available():
        if mode == "auto":
            return "twin"
        raise RuntimeError(f"step kernel mode {mode!r} needs Triton, which is not installed")
    return "op" if mode == "auto" else mode


def step(family: str, coef: torch.Tensor, scale: float, *, step_mode: str = DEFAULT_MODE, store=(),
         **kwargs) -> tuple:
    """One step of kernel ``family``; returns its outputs in family order, None where not written.

    ``kwargs`` are the family's tensor inputs (x, cond, uncond, ...; omitted or None = absent)
    and all of its switches; ``store`` names the optional outputs to write.
    ``coef`` is the fp32 coefficient row on x's device, ``scale`` the CFG scale, ``step_mode``
    one of ``MODES``.
    """
    fam = FAMILIES[family]
    unknown = set(kwargs) - set(fam.inputs) - set(fam.switches)
    missing = set(fam.switches) - set(kwargs)
    if unknown or missing:
        raise TypeError(f"fused {family}: unknown {sorted(unknown)}, missing switches {sorted(missing)}")
    tensors = {name: kwargs[name] for name in fam.inputs if kwargs.get(name) is not None}
    switches = {name: int(kwargs[name]) for name in fam.switches}
    store = frozenset(store)
    how = backend(tensors["x"], step_mode)
    if how == "twin":
        return call_twin(fam, coef, scale, tensors, store, switches)
    from .ops import launch_triton, run_op

    if how == "op":
        return run_op(fam, coef, scale, tensors, store, switches)
    got = launch_triton(fam, coef, scale, tensors, store, switches)
    if how == "check":
        _compare(fam, got, call_twin(fam, coef, scale, tensors, store, switches))
    return got


def _compare(fam, got: tuple, want: tuple) -> None:
    """Kernel vs twin: the same fp32 math, so equal up to the kernel's FMA contraction (GPUs) and
    the one rounding to the storage dtype."""
    for name, a, b in zip(fam.outputs, got, want):
        if (a is None) != (b is None):
            raise StepMismatch(f"fused {fam.name}: output {name} written by only one of kernel and twin")
        if a is None:
            continue
        tol = 1e-5 if a.dtype == torch.float32 else torch.finfo(a.dtype).eps
        if a.shape != b.shape or a.dtype != b.dtype or not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol):
            diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("nan")
            raise StepMismatch(f"fused {fam.name}: output {name} differs from the torch twin "
                               f"(max |kernel - twin| = {diff:.3g}, tolerance {tol:g})")
