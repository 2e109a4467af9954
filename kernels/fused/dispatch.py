"""Run one fused sampler step: the Triton kernel on CUDA, the torch twin elsewhere.

The switch, for A/B checks: environment ``KILN_FUSED`` (read at import) or :func:`set_mode`.

* ``auto`` (default, also ``1``/``on``): CUDA tensors go through ``torch.ops.kiln.fused_*``
  (the Triton kernel, visible to torch.export), everything else through the twin.
* ``off`` (``0``): always the twin, i.e. eager torch with the same arithmetic.
* ``triton``: always launch the Triton kernel directly, whatever the device; on CPU this only
  works under ``TRITON_INTERPRET=1`` (the tests' interpret mode).
"""
from __future__ import annotations

import contextlib
import os

import torch

from .ops import FAMILIES, TRITON_AVAILABLE, call_twin, launch_triton, op_args

_ALIASES = {"": "auto", "1": "auto", "on": "auto", "true": "auto", "auto": "auto",
            "0": "off", "off": "off", "false": "off", "triton": "triton"}


def _parse(value: str) -> str:
    try:
        return _ALIASES[value.strip().lower()]
    except KeyError:
        raise ValueError(f"KILN_FUSED={value!r}: expected one of auto/1, off/0, triton") from None


_mode = _parse(os.environ.get("KILN_FUSED", "auto"))


def get_mode() -> str:
    return _mode


def set_mode(mode: str) -> None:
    """``auto``, ``off`` or ``triton`` (see the module docstring)."""
    global _mode
    mode = _parse(mode)
    if mode == "triton" and not TRITON_AVAILABLE:
        raise RuntimeError("KILN_FUSED=triton needs Triton, which is not installed")
    _mode = mode


@contextlib.contextmanager
def mode(value: str):
    """Temporarily switch the fused-kernel mode."""
    previous = get_mode()
    set_mode(value)
    try:
        yield
    finally:
        set_mode(previous)


def backend(x: torch.Tensor) -> str:
    """``op`` (torch.library Triton op), ``triton`` (direct launch) or ``twin`` for a step on ``x``."""
    if _mode == "off" or not TRITON_AVAILABLE:
        return "twin"
    if _mode == "triton":
        return "triton"
    return "op" if x.is_cuda else "twin"


def step(family: str, coef: torch.Tensor, scale: float, *, store=(), **kwargs) -> tuple:
    """One step of kernel ``family``; returns its outputs in family order, None where not written.

    ``kwargs`` are the family's tensor inputs (x, cond, uncond, ...; omitted or None = absent)
    and all of its switches; ``store`` names the optional outputs to write.
    ``coef`` is the fp32 coefficient row on x's device, ``scale`` the CFG scale.
    """
    fam = FAMILIES[family]
    unknown = set(kwargs) - set(fam.inputs) - set(fam.switches)
    missing = set(fam.switches) - set(kwargs)
    if unknown or missing:
        raise TypeError(f"fused {family}: unknown {sorted(unknown)}, missing switches {sorted(missing)}")
    tensors = {name: kwargs[name] for name in fam.inputs if kwargs.get(name) is not None}
    switches = {name: int(kwargs[name]) for name in fam.switches}
    store = frozenset(store)
    how = backend(tensors["x"])
    if how == "twin":
        return call_twin(fam, coef, scale, tensors, store, switches)
    if how == "triton":
        return launch_triton(fam, coef, scale, tensors, store, switches)
    outs = getattr(torch.ops.kiln, f"fused_{family}")(*op_args(fam, coef, scale, tensors, store, switches))
    writes = fam.writes(store, switches)
    return tuple(o if name in writes else None for name, o in zip(fam.outputs, outs))
