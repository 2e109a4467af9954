"""The Triton launcher and the ``torch.library`` ops (``kiln::fused_<family>``) of the step kernels.

One generic launcher and one op registration serve every family (``families.FAMILIES``). The
ops are ``triton_op``s, so torch.export / AOTInductor on CUDA keep (and compile) the Triton
kernels; their CPU kernel is the torch twin. Importing this module registers them: a runtime
must import it before loading a plan that contains them. Without Triton nothing is registered
and ``TRITON_AVAILABLE`` is False (the twins still work).
"""
from __future__ import annotations

from typing import Callable

import torch

from .families import FAMILIES, Family, call_twin

try:
    import triton
    from torch.library import triton_op, wrap_triton

    from . import triton_kernels
except ImportError:  # no Triton: twins only
    triton_kernels = None

TRITON_AVAILABLE = triton_kernels is not None
BLOCK = 1024


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


def run_op(family: Family, coef, scale, tensors: dict, store: frozenset, switches: dict) -> tuple:
    """The step through ``torch.ops.kiln.fused_<family>`` (what torch.export records)."""
    outs = getattr(torch.ops.kiln, f"fused_{family.name}")(*op_args(family, coef, scale, tensors, store, switches))
    writes = family.writes(store, switches)
    return tuple(o if name in writes else None for name, o in zip(family.outputs, outs))


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
