"""Kernel families: each step kernel's tensor inputs (pointer order), outputs and switches, and
the call of its torch twin. No Triton here, so the twins run wherever torch does.

``flagged`` inputs are optional and announced to the kernel as ``HAS_<NAME>``; ``stored``
outputs are written only on request (``STORE_<NAME>``); ``switches`` are the other compile-time
ints (``combined``: the ``cond`` given is already the guided prediction and ``uncond`` is read
only by the CFG++ update).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import twins


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
           ("uncond", "noise"), ("den",), ("cfg_pp", "combined")),
    Family("cfgpp_euler", twins.cfgpp_euler, ("x", "cond", "uncond", "noise"), ("out", "den"),
           ("noise",), ("den",), ("combined",)),
    Family("cfgpp_2s", twins.cfgpp_2s, ("x", "cond", "uncond", "den1", "noise"), ("out", "den"),
           ("den1", "noise"), ("den",), ("combined",)),
    Family("cfgpp_2m", twins.cfgpp_2m, ("x", "cond", "uncond", "old"), ("out", "den"), ("old",), ("den",),
           ("combined",)),
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
