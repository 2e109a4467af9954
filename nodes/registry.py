"""The node catalogue: one declarative definition per supported ComfyUI ``class_type``.

A definition carries what validation and the compiler need without running anything
(ComfyUI's input names, types, defaults, ranges, choices and output slot order; whether the
node is foldable or seeded) plus the eager function the interpreter calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# ComfyUI's widget (primitive) types; everything else is a link-only socket type.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


@dataclass(frozen=True)
class InputSpec:
    """One node input, named and typed as ComfyUI names and types it.

    ``choices`` is a static list for COMBO widgets, or a callable ``(context) -> list[str]``
    for file pickers whose choices are the files in a model/input folder.
    """

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | bool | None = None
    choices: Sequence[str] | Callable[[Any], Sequence[str]] | None = None
    optional: bool = False
    multiline: bool = False
    # Where a COMBO lists files: the model folder kind ("checkpoints", ...) or "input".
    folder: str | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES


@dataclass(frozen=True)
class NodeDef:
    class_type: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    function: Callable[..., tuple]
    output_names: tuple[str, ...] = ()
    # Deterministic, cheap to keep: evaluated at compile time when all its inputs are constant.
    foldable: bool = True
    # Draws random numbers from a seed input: never merged with a twin, seed is a runtime input.
    seeded: bool = False
    # Writes files or shows results (SaveImage, PreviewImage): the graph's roots.
    output_node: bool = False
    category: str = ""
    # Nodes whose function needs the run context (folders, device, progress, prompt JSON).
    needs_context: bool = False

    def input(self, name: str) -> InputSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None


_REGISTRY: dict[str, NodeDef] = {}


def register(node: NodeDef) -> NodeDef:
    if node.class_type in _REGISTRY:
        raise ValueError(f"node {node.class_type!r} registered twice")
    _REGISTRY[node.class_type] = node
    return node


def node(class_type: str, inputs: Sequence[InputSpec], outputs: Sequence[str], *,
         output_names: Sequence[str] = (), **flags: Any) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the eager semantics of ``class_type``."""

    def wrap(fn: Callable) -> Callable:
        register(NodeDef(class_type=class_type, inputs=tuple(inputs), outputs=tuple(outputs),
                         function=fn, output_names=tuple(output_names) or tuple(outputs), **flags))
        return fn

    return wrap


def get(class_type: str) -> NodeDef | None:
    _load_all()
    return _REGISTRY.get(class_type)


def all_nodes() -> dict[str, NodeDef]:
    _load_all()
    return dict(_REGISTRY)


def _load_all() -> None:
    """Import every node family module once (each registers its nodes on import)."""
    from kiln.nodes import families  # noqa: F401  (import side effect registers nodes)


# Shorthand constructors used by the node family modules.
def INT(name: str, default: int, min: int = -(2 ** 63), max: int = 2 ** 63 - 1, step: int = 1,
        **kw: Any) -> InputSpec:
    return InputSpec(name, "INT", default=default, min=min, max=max, step=step, **kw)


def FLOAT(name: str, default: float, min: float = -1e9, max: float = 1e9, step: float = 0.01,
          round: float | bool | None = None, **kw: Any) -> InputSpec:
    return InputSpec(name, "FLOAT", default=default, min=min, max=max, step=step, round=round, **kw)


def STRING(name: str, default: str = "", multiline: bool = False, **kw: Any) -> InputSpec:
    return InputSpec(name, "STRING", default=default, multiline=multiline, **kw)


def BOOLEAN(name: str, default: bool, **kw: Any) -> InputSpec:
    return InputSpec(name, "BOOLEAN", default=default, **kw)


def COMBO(name: str, choices: Sequence[str] | Callable[[Any], Sequence[str]], default: str | None = None,
          **kw: Any) -> InputSpec:
    return InputSpec(name, "COMBO", default=default, choices=choices, **kw)


def SOCKET(name: str, type: str, optional: bool = False) -> InputSpec:
    return InputSpec(name, type, optional=optional)


@dataclass
class RunContext:
    """What node functions may consult beyond their inputs (set by the interpreter)."""

    models: Any = None          # kiln.nodes.folders.ModelFolders
    input_dir: str | None = None
    output_dir: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    prompt: dict | None = None          # the API workflow, embedded into saved PNGs
    extra_pnginfo: dict | None = None   # {"workflow": ...} when the UI workflow is known
    node_id: str = ""
    progress: Callable[[int, int], None] | None = None
    cache: dict = field(default_factory=dict)   # loaded models, keyed by path and options

    @property
    def torch_dtype(self):
        """The compute dtype for diffusion models ("fp32" | "fp16" | "bf16")."""
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]
