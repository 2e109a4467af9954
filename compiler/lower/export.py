"""torch.export of a stage module with dynamic batch/spatial dims, and its AOTInductor build.

Export is non-strict (the modules are plain diffusers/spandrel code) with
``backed_size_oblivious``: without it every size that happens to be 1 deep inside the UNet
(a 64-px image at the lowest level, batch 1) would pin the artifact to that size. Each
dynamic dim gets its own ``Dim.DYNAMIC(min, max)`` hint; export unifies dims the code ties
together (x's and sigma's batch) and narrows ranges to what the code supports (the UNet's
batch to 31, where diffusers switches code paths), and ``check_ranges`` compares the result
with what the plan's runtime inputs need.
"""
from __future__ import annotations

import inspect
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
from torch.export import Dim, ExportedProgram

# Weights stay out of the .so: the plan stores each once and the runtime fills them in. Without
# always_keep_tensor_constants Inductor inlines tiny weights (a 4-element conv bias) as literals,
# which would tie the artifact to one checkpoint's values. Without layout_optimization off, Inductor
# feeds the convolutions channels-last tensors, which oneDNN meets by re-laying every filter on
# every call: the SD1.5 UNet took 1.9 s per call at a 64-px image instead of 1.05 s (eager: 0.99 s).
INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True,
                    "layout_optimization": False}

DimRange = tuple[int, int]


@dataclass(frozen=True)
class ArgSpec:
    """One positional argument: an example tensor, its dynamic dims with the range each may
    take in the artifact, and the dims whose range runtime inputs require (a subset)."""

    example: torch.Tensor
    dynamic: dict[int, DimRange]
    required: dict[int, DimRange]


class ShapeRangeError(ValueError):
    """The exported artifact cannot take a size the plan's declared inputs allow."""


def export_module(module: torch.nn.Module, args: list[ArgSpec]) -> ExportedProgram:
    """``torch.export`` with one ``Dim.DYNAMIC`` per dynamic dim (non-strict).

    Weights loaded under inference mode (the interpreter's loaders) must not ask for gradients,
    or export's requires_grad bookkeeping refuses them; stage modules are inference-only anyway.
    """
    module.requires_grad_(False)
    shapes = tuple({dim: Dim.DYNAMIC(min=lo, max=hi) for dim, (lo, hi) in a.dynamic.items()} or None
                   for a in args)
    params = list(inspect.signature(module.forward).parameters.values())
    if len(params) == 1 and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        shapes = (shapes,)   # forward(*tensors): the specs nest like the arguments
    with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
        return torch.export.export(module, tuple(a.example for a in args), dynamic_shapes=shapes, strict=False)


def dim_ranges(ep: ExportedProgram) -> list[dict[int, DimRange | int]]:
    """Per user input of ``ep``: dim -> (min, max) for symbolic dims, or the fixed size."""
    user_inputs = set(ep.graph_signature.user_inputs)
    out = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta["val"]
        dims: dict[int, DimRange | int] = {}
        for i, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt):
                bounds = ep.range_constraints.get(size.node.expr)
                dims[i] = (int(bounds.lower), int(bounds.upper)) if bounds is not None else (0, 2 ** 63 - 1)
            else:
                dims[i] = int(size)
        out.append(dims)
    return out


def check_ranges(ep: ExportedProgram, args: list[ArgSpec], labels: list[str]) -> None:
    """Every required (min, max) must lie inside what the artifact accepts.

    A lower bound of 2 counts as 1: export keeps sizes of 1 out of a dynamic range (conv's
    fake implementation asks ``size > 1`` to pick a memory layout) although the compiled code
    computes size 1 the same way; the plan tests run batch 1 through such artifacts.
    """
    problems = []
    for spec, dims, label in zip(args, dim_ranges(ep), labels):
        for dim, (lo, hi) in spec.required.items():
            got = dims.get(dim)
            if isinstance(got, int):
                ok, found = got == lo == hi, str(got)
            else:
                ok, found = (1 if got[0] <= 2 else got[0]) <= lo and got[1] >= hi, f"{got[0]}..{got[1]}"
            if not ok:
                problems.append(f"{label} dim {dim} supports {found} but the declared inputs allow {lo}..{hi}")
    if problems:
        raise ShapeRangeError("; ".join(problems))


def constant_tensors(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """Constant FQN -> tensor: the names an AOTI package compiled without its weights asks for."""
    return {**ep.state_dict, **ep.constants}


def aoti_compile(ep: ExportedProgram) -> bytes:
    """The ``.pt2`` package (bytes) for the device the program's tensors live on."""
    with tempfile.TemporaryDirectory(prefix="kiln-aoti-") as tmp:
        path = Path(tmp) / "stage.pt2"
        # A copy: aoti_compile_and_package adds its own keys to the dict it is given.
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=dict(INDUCTOR_CONFIGS))
        return path.read_bytes()
