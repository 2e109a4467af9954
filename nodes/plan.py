"""What the export-safe modules of plan-capable nodes share (their ``PlanSpec.lower``).

A node's module computes what its eager function computes, with the same float operations, but
written so ``torch.export`` can keep batch and spatial sizes symbolic: sizes derived from the input
are computed with integer arithmetic the shape solver can follow, and anything that needs concrete
sizes raises ``NeedsStaticShapes`` while tracing, so lowering can retry with fixed sizes (or
refuse, naming the node, when the sizes are runtime inputs).
"""
from __future__ import annotations

from fractions import Fraction

from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kiln.kernels.errors import Problem


def plan_problem(node, message: str, **kw) -> Problem:
    """A problem naming ``node`` (anything with ``id``, ``class_type`` and ``title``)."""
    return Problem("unsupported_in_plan", message, node_id=node.id, class_type=node.class_type,
                   title=node.title, **kw)


class NeedsStaticShapes(Exception):
    """Raised while tracing with symbolic sizes when an op can only work with concrete ones."""

    def __init__(self, problem: Problem):
        super().__init__(problem.format())
        self.problem = problem


def is_static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def need_static(node, message: str, *sizes, **kw) -> None:
    if not is_static(*sizes):
        raise NeedsStaticShapes(plan_problem(node, message, **kw))


def scaled_size(size, scale: float, node, what: str):
    """``round(size * scale)`` as ComfyUI computes it; for a symbolic size only when the product
    is provably a whole number (then no rounding is involved), else ``NeedsStaticShapes``."""
    if isinstance(size, int):
        return round(size * scale)
    ratio = Fraction(scale)
    if statically_known_true((size * ratio.numerator) % ratio.denominator == 0):
        return (size * ratio.numerator) // ratio.denominator
    raise NeedsStaticShapes(plan_problem(node, f"the {what} times {scale} is not always a whole number of pixels, "
                                         "so the rounded size cannot follow a runtime size", input_name="scale_by"))


class NodeModule(nn.Module):
    """A plan-capable node's export-safe module: ``forward(**socket values) -> output 0``."""

    def __init__(self, node):
        super().__init__()
        self.node_id = node.id
        self.node = node
