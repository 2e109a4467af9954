"""The node catalogue: one declarative definition per supported ComfyUI ``class_type``.

A definition carries what validation and the compiler need without running anything
(ComfyUI's input names, types, defaults, ranges, choices and output slot order; whether the
node is foldable, which widget is its seed), the eager function the interpreter calls and, for
a node that runs inside compiled plans, its :class:`PlanSpec`. Every module of ``kiln.nodes``
is imported when the catalogue is first read, so a node cannot be left out by forgetting an
import; registering a class_type twice, or a plan spec that does not fit its node, fails at
import.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from kiln.kernels.settings import Settings

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


# What a plan stage of each kind is built from (kiln.runtime.kinds executes them).
PLAN_KINDS = ("sample", "empty_latent", "save_image", "module", "lora", "load_image", "bind")


@dataclass(frozen=True)
class PlanSpec:
    """How a node runs inside a compiled plan (docs/plans.md, "Node plan specs"). A node without
    one runs in a plan only when it can be folded (evaluated at compile time).

    ``kind``: the stage kind that executes it at run time. ``runtime_widgets``: the widgets a
    plan may take as runtime inputs (``kiln compile --input NODE.WIDGET``), each with its
    stage-local setting name. ``params``: fixed stage params this node adds. For ``module``
    nodes, ``computes`` names the tensor fields of output 0 the module produces (a LATENT output
    carries the other fields of its LATENT input over, as ComfyUI's dict copy does) and
    ``lower(node, widgets)`` builds the export-safe ``nn.Module`` whose ``forward(**sockets)``
    returns output 0, from the node (id, class_type, title: for error messages) and its constant
    widget values and model handles.

    ``bind`` nodes (ControlNetApply, IPAdapter) are evaluated at compile time like folded ones,
    even when the image ``sockets`` they name are run-time values: what they build (a Control,
    an IP-Adapter patch) holds the tensors derived from those images in ``Tensors`` buffers,
    which ``bound(outputs)`` finds (field -> [(Tensors, buffer name)]). A module stage lowered
    from ``lower`` computes those ``computes`` fields from the run-time images
    (``forward(**sockets) -> {field: tensor}``), and the denoiser reads them in place of the
    buffers. Their other inputs must be constants.
    """

    kind: str
    runtime_widgets: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    computes: tuple[str, ...] = ()
    lower: Callable[[Any, dict], Any] | None = None
    sockets: tuple[str, ...] = ()
    bound: Callable[[tuple], dict] | None = None
    # Inputs a bind node needs only for what its images give: with constant images they are
    # used at compile time alone (the plan leaves their models out).
    compile_only: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in PLAN_KINDS:
            raise ValueError(f"plan spec kind {self.kind!r}: expected one of {', '.join(PLAN_KINDS)}")
        if (self.kind in ("module", "bind")) != (self.lower is not None and bool(self.computes)):
            raise ValueError("module and bind plan specs need lower and computes, other kinds neither")
        if (self.kind == "bind") != (self.bound is not None and bool(self.sockets)):
            raise ValueError("a bind plan spec needs sockets and bound, other kinds neither")


@dataclass(frozen=True)
class NodeDef:
    class_type: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    function: Callable[..., tuple]
    output_names: tuple[str, ...] = ()
    # Deterministic, cheap to keep: evaluated at compile time when all its inputs are constant.
    foldable: bool = True
    # The INT widget it draws random numbers from: never merged with a twin, a runtime input of
    # plans, what --seed sets.
    seed: str | None = None
    # Writes files or shows results (SaveImage, PreviewImage): the graph's roots.
    output_node: bool = False
    category: str = ""
    # Nodes whose function needs the run context (folders, device, progress, prompt JSON).
    needs_context: bool = False
    plan: PlanSpec | None = None
    # What ComfyUI's /object_info says of it: its menu name and the module defining it there.
    display_name: str | None = None
    python_module: str = "nodes"
    # raw inputs -> a hint added to the node's validation problems, for graphs written for
    # another node (the IPAdapter node given IPAdapterAdvanced's inputs); None when it fits.
    misuse_hint: Callable[[dict], str | None] | None = None

    def __post_init__(self):
        widgets = {spec.name for spec in self.inputs if spec.is_widget}
        if self.seed is not None and self.input(self.seed) is None:
            raise ValueError(f"node {self.class_type!r}: seed widget {self.seed!r} is not one of its inputs")
        if self.plan is not None and not set(self.plan.runtime_widgets) <= widgets:
            raise ValueError(f"node {self.class_type!r}: runtime widgets "
                             f"{sorted(set(self.plan.runtime_widgets) - widgets)} are not widgets of the node")
        misbound = [name for name in (self.plan.sockets if self.plan else ()) if self.input(name) is None
                    or self.input(name).is_widget]
        if misbound:
            raise ValueError(f"node {self.class_type!r}: bound sockets {misbound} are not sockets of the node")

    def input(self, name: str) -> InputSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None


@dataclass(frozen=True)
class UiOutput:
    """What an output node shows (ComfyUI's ``{"ui": {...}}`` return): the images it wrote, each
    a ``kiln.runtime.images.SavedImage``."""

    images: tuple = ()


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


_loaded = False


def _load_all() -> None:
    """Import every module of ``kiln.nodes`` once (each registers its nodes on import)."""
    global _loaded
    if _loaded:
        return
    import kiln.nodes as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    _loaded = True


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
    # preview(denoised sampler-space latent, its LatentFormat) after each sampler step, when wanted
    preview: Callable[[Any, Any], None] | None = None
    # called before each evaluation of a sampler's model (kiln bench counts model calls)
    on_model_call: Callable[[], None] | None = None
    cache: dict = field(default_factory=dict)   # loaded models, keyed by path and options
    # Hold every loaded model as long as the context lives (a caller that runs graphs again with it,
    # a benchmark's warm runs); by default a model is freed once no node of the run reads it.
    keep_models: bool = False
    settings: Settings = field(default_factory=Settings)

    @property
    def torch_dtype(self):
        """The compute dtype for diffusion models ("fp32" | "fp16" | "bf16")."""
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]
