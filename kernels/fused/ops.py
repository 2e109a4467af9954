"""Kernel families, the Triton launcher, and their ``torch.library`` ops (``kiln::fused_<family>``).

A family names a kernel's tensor inputs (pointer order), outputs, the optional inputs it is told
about (``HAS_<NAME>``), the outputs written only on request (``STORE_<NAME>``) and its other
compile-time switches. One generic launcher and one op registration serve every family.

The ops are ``triton_op``s, so torch.export / AOTInductor on CUDA keep (and compile) the Triton
kernels; their CPU kernel is the torch twin. Importing this module registers them: a runtime
must import it before loading a plan that contains them. Without Triton nothing is registered
and ``TRITON_AVAILABLE`` is False (the twins still work).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import twins

try:
    import triton
    from torch.library import triton_op, wrap_triton

    from . import triton_kernels
except ImportError:  # no Triton: twins only
    triton_kernels = None

TRITON_AVAILABLE = triton_kernels is not None
BLOCK = 1024


@dataclass(frozen=True)
class Family:
    name: str
    twin: Callable
    inputs: tuple[str, ...]                 # kernel pointer order; x and cond are required
    outputs: tuple[str, ...]
    flagged: tuple[str, ...] = ()           # optional inputs announced as HAS_<NAME>
    stored: tuple[str, ...] = ()            # outputs written on request (STORE_<NAME>)
    switches: tuple[str, ...] = ()          # other int switches, lower-case here, upper-case in the kernel
    writes_fn: Callable[[frozenset, dict], set] | None = field(default=None, compare=False)

    @property
    def kernel_name(self) -> str:
        return f"{self.name}_kernel"

    def writes(self, store: frozenset, switches: dict) -> set:
        """The outputs this call produces."""
        if self.writes_fn is not None:
            return self.writes_fn(store, switches)
        return {"out"} | set(store)


def _er_sde_writes(store: frozenset, sw: dict) -> set:
    """The first stage has no divided difference to store."""
    return {"out"} | (store - {"den_d"} if sw["stage"] < 2 else store)


def _unipc_writes(store: frozenset, sw: dict) -> set:
    out = {"m"}
    if sw["nc"] >= 0:
        out.add("out")
    if sw["np"] >= 0:
        out |= {"xp", "xm"}
    return out


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("denoised", twins.denoised, ("x", "cond", "uncond", "noise"), ("out", "den"), ("uncond", "noise"),
           ("den",)),
    Family("euler", twins.euler, ("x", "cond", "uncond", "y", "noise"), ("out", "den"),
           ("uncond", "y", "noise"), ("den",)),
    Family("heun", twins.heun, ("x", "cond", "uncond", "x2", "den1"), ("out", "den"), ("uncond",), ("den",)),
    Family("multistep", twins.multistep, ("x", "cond", "uncond", "h1", "h2", "h3"), ("out", "d", "den"),
           ("uncond", "h1", "h2", "h3"), ("d", "den"), ("sequential",)),
    Family("expint", twins.expint, ("x", "cond", "uncond", "old", "noise"), ("out", "den"),
           ("uncond", "old", "noise"), ("den",)),
    Family("sde_multistep", twins.sde_multistep, ("x", "cond", "uncond", "h1", "h2", "noise"), ("out", "den"),
           ("uncond", "noise"), ("den",), ("mode",)),
    Family("res", twins.res, ("x", "cond", "uncond", "old", "noise"), ("out", "den"),
           ("uncond", "noise"), ("den",), ("cfg_pp",)),
    Family("cfgpp_euler", twins.cfgpp_euler, ("x", "cond", "uncond", "noise"), ("out", "den"),
           ("noise",), ("den",)),
    Family("cfgpp_2s", twins.cfgpp_2s, ("x", "cond", "uncond", "den1", "noise"), ("out", "den"),
           ("den1", "noise"), ("den",)),
    Family("cfgpp_2m", twins.cfgpp_2m, ("x", "cond", "uncond", "old"), ("out", "den"), ("old",), ("den",)),
    Family("ddpm", twins.ddpm, ("x", "cond", "uncond", "noise"), ("out", "den"),
           ("uncond", "noise"), ("den",), ("rescale",)),
    Family("er_sde", twins.er_sde, ("x", "cond", "uncond", "old", "old_d", "noise"), ("out", "den", "den_d"),
           ("uncond", "noise"), ("den", "den_d"), ("stage",), writes_fn=_er_sde_writes),
    Family("unipc", twins.unipc, ("x", "cond", "uncond", "xin", "m0", "m1", "m2"), ("out", "m", "xp", "xm"),
           ("uncond",), (), ("nc", "np", "final"), writes_fn=_unipc_writes),
)}


def call_twin(family: Family, coef, scale, tensors: dict, store: frozenset, switches: dict) -> tuple:
    stores = {f"store_{name}": name in store for name in family.stored}
    return family.twin(coef, scale, **tensors, **stores, **switches)


def launch_triton(family: Family, coef: torch.Tensor, scale: float, tensors: dict, store: frozenset,
                  switches: dict, launcher: Callable = lambda kernel: kernel) -> tuple:
    """Run the family's Triton kernel; returns outputs in family order (None where not written).

    ``launcher`` wraps the kernel (``wrap_triton`` inside a ``triton_op``).
    """
    x = tensors["x"]
    n = x.numel()
    args = []
    for name in family.inputs:
        t = tensors.get(name)
        if t is not None and t.numel() != n:
            raise ValueError(f"fused {family.name}: {name} has {t.numel()} elements, x has {n}")
        args.append(x if t is None else t.contiguous())
    writes = family.writes(store, switches)
    outs = [torch.empty_like(x, memory_format=torch.contiguous_format) if name in writes else None
            for name in family.outputs]
    args += [x if o is None else o for o in outs]
    meta = {f"HAS_{name.upper()}": int(tensors.get(name) is not None) for name in family.flagged}
    meta.update({f"STORE_{name.upper()}": int(name in store) for name in family.stored})
    meta.update({name.upper(): int(value) for name, value in switches.items()})
    kernel = getattr(triton_kernels, family.kernel_name)
    launcher(kernel)[(triton.cdiv(n, BLOCK),)](*args, coef, float(scale), n, **meta, BLOCK=BLOCK)
    return tuple(outs)


# --- torch.library registration ------------------------------------------------------------------

def _schema(family: Family) -> str:
    tensors = ", ".join(f"Tensor{'' if name in ('x', 'cond') else '?'} {name}" for name in family.inputs)
    return f"(Tensor coef, float scale, {tensors}, int store, int[] switches) -> Tensor[]"


def _unpack(family: Family, args: tuple) -> tuple:
    coef, scale = args[0], args[1]
    tensors = dict(zip(family.inputs, args[2:2 + len(family.inputs)]))
    store_mask, switch_values = args[-2], args[-1]
    store = frozenset(name for i, name in enumerate(family.outputs) if store_mask >> i & 1)
    return coef, scale, tensors, store, dict(zip(family.switches, switch_values))


def _as_list(x: torch.Tensor, outs: tuple) -> list:
    """Custom ops return fixed lists: unwritten outputs become empty tensors."""
    return [x.new_empty(0) if o is None else o for o in outs]


def _register(family: Family):
    def triton_impl(*args):
        coef, scale, tensors, store, switches = _unpack(family, args)
        return _as_list(tensors["x"], launch_triton(family, coef, scale, tensors, store, switches, wrap_triton))

    def cpu_impl(*args):
        coef, scale, tensors, store, switches = _unpack(family, args)
        return _as_list(tensors["x"], call_twin(family, coef, scale, tensors, store, switches))

    op = triton_op(f"kiln::fused_{family.name}", triton_impl, mutates_args=(), schema=_schema(family))
    op.register_kernel("cpu", cpu_impl)
    return op


def op_args(family: Family, coef, scale, tensors: dict, store: frozenset, switches: dict) -> list:
    """Positional arguments of ``torch.ops.kiln.fused_<family>``."""
    mask = sum(1 << i for i, name in enumerate(family.outputs) if name in store)
    return [coef, float(scale), *(tensors.get(name) for name in family.inputs), mask,
            [int(switches[name]) for name in family.switches]]


OPS = {name: _register(family) for name, family in FAMILIES.items()} if TRITON_AVAILABLE else {}
