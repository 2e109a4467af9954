"""The IR between the compiler passes and lowering (shapes pinned in docs/plans.md).

``Compilation`` is the value every pass maps to a new one; ``StagedProgram`` is what lowering
turns into a plan file. Values at run time live in an environment of named tensors
(``kiln.runtime.env`` spells the names); ``flatten``/``unflatten`` define the fields.

Module stages carry their chain of workflow nodes (``Stage.members``); ``chain_members`` resolves
each member's inputs for ``build_chain``: a widget constant stays a Python value, a model-type
(``MODEL_TYPES``) link becomes its compile-time handle, a link to an earlier member stays a
``Link``, and a tensor the stage receives becomes a ``StageInput`` naming its positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.compiler.graph import Graph, Link, Node
from kiln.kernels.settings import Settings
from kiln.nodes import registry
from kiln.nodes.folders import ModelFolders
from kiln.nodes.image import IMAGE_TO_UINT8
from kiln.nodes.registry import NodeDef
from kiln.runtime import env as env_names
from kiln.runtime.manifest import RuntimeInput

# Socket types whose values are modules: evaluated at compile time, never plan constants.
MODEL_TYPES = frozenset({"MODEL", "CLIP", "VAE", "UPSCALE_MODEL", "CONTROL_NET", "CLIP_VISION", "IPADAPTER"})
# How a value's tensor is laid out, for the dims lowering keeps dynamic: (socket type, field) -> layout.
LAYOUTS = {("LATENT", "samples"): "latent", ("IMAGE", "value"): "image", ("MASK", "value"): "image"}


@dataclass
class Stage:
    name: str                # unique: "sample_3", "module_8-11-12-13", "save_9"
    kind: str                # "sample" | "module" | "save_image" | "empty_latent"
    node_ids: list[str]      # workflow nodes this stage implements (inspect, error messages)
    inputs: dict[str, str]   # stage-local name -> environment name
    outputs: dict[str, str]  # stage-local name -> environment name
    params: dict             # JSON-able settings
    module: torch.nn.Module | None = None   # compile side only: what lowering exports
    # Compile side only: a module stage's nodes in execution order (see chain_members).
    members: list[Node] = field(default_factory=list)


@dataclass
class StagedProgram:
    stages: list[Stage]
    constants: dict[str, torch.Tensor]
    inputs: list[RuntimeInput]
    folded: list[dict]         # [{"node_id", "class_type", "outputs": [env names]}] for inspect
    dropped_models: list[str]  # model parts used only by folded nodes: "file.safetensors (CLIP)"
    workflow: dict             # the source API workflow (for PNG "prompt" chunks)
    target: dict               # {"device": "cpu", "dtype": "fp32", "backend": "aoti"}
    layouts: dict[str, str] = field(default_factory=dict)   # env name -> "latent" | "image" | "tokens"
    patchable: list = field(default_factory=list)   # lora_targets.PatchableGroup: weights a LoRA may patch


@dataclass(frozen=True)
class EnvValue:
    """Where one socket value lives at run time: its tensor fields' environment names, plus the
    parts known at compile time (LATENT ``batch_index``, CONDITIONING per-entry options)."""

    type: str
    fields: dict[str, str]
    meta: Any = None


@dataclass(frozen=True)
class Binding:
    """A buffer that a bind node built from a workflow image and that the run-time image's
    tensor replaces: field ``field`` of that node's module stage (``PlanSpec.bound``)."""

    node_id: str
    field: str
    module: Any      # the kiln.nodes.models.patching.Tensors holding it
    buffer: str

    @property
    def env(self) -> str:
        return env_names.value_env(self.node_id, 0, self.field)


@dataclass(frozen=True)
class StageInput:
    """A member input a module stage receives as positional tensors: field -> position."""

    type: str
    fields: dict[str, int]


@dataclass(frozen=True)
class CompileOptions:
    models: ModelFolders | None = None
    input_dir: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    backend: str = "aoti"
    weights: str | None = None      # "fp16": fp32 weights stored halved in the plan
    inputs: tuple[str, ...] = ()    # the --input declarations, "NODE.INPUT[=lo..hi]"
    settings: Settings = Settings()


@dataclass(frozen=True)
class Compilation:
    """Everything the passes know so far; each pass returns a new one."""

    graph: Graph
    options: CompileOptions = CompileOptions()
    inputs: tuple[RuntimeInput, ...] = ()
    runtime_nodes: tuple[str, ...] = ()          # nodes that run in stages, in topological order
    handles: dict[str, tuple] = field(default_factory=dict)      # model node -> compile-time outputs
    folded_clips: tuple[tuple[str, str, Any], ...] = ()          # (folded node, CLIP source, the CLIP)
    runtime_loras: tuple[Node, ...] = ()         # LoRA nodes applied at run time (runtime_loras pass)
    bindings: tuple[Binding, ...] = ()           # buffers run-time images replace (fold_constants)
    # Where socket values live at run time: folded outputs run-time nodes read (fold_constants),
    # then every value a stage reads (partition_stages).
    values: dict[Link, EnvValue] = field(default_factory=dict)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    folded: tuple[dict, ...] = ()
    dropped_models: tuple[str, ...] = ()
    stages: tuple[Stage, ...] = ()

    def program(self) -> StagedProgram:
        from kiln.compiler.lora_targets import patchable_groups   # imports the model modules

        layouts = {name: LAYOUTS[(value.type, field)] for value in self.values.values()
                   for field, name in value.fields.items() if (value.type, field) in LAYOUTS}
        layouts.update({stage.outputs["tokens"]: "tokens" for stage in self.stages if stage.kind == "tokenize"})
        return StagedProgram(
            stages=list(self.stages), constants=dict(self.constants), inputs=list(self.inputs),
            folded=list(self.folded), dropped_models=list(self.dropped_models),
            workflow=self.graph.source or {},
            target={"device": self.options.device, "dtype": self.options.dtype, "backend": self.options.backend,
                    **({"weights": self.options.weights} if self.options.weights else {})}, layouts=layouts,
            patchable=patchable_groups(self.handles, self.folded_clips))


def flatten(socket_type: str, value: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """A socket value -> (tensor fields, compile-time rest).

    LATENT: its tensor keys (``samples``, ``noise_mask``); CONDITIONING entry i:
    ``<i>.cond`` and ``<i>.<key>`` for tensor options (``pooled_output``), the other options as
    meta (one dict per entry); anything else: the tensor itself as ``value``.
    """
    if socket_type == "LATENT":
        return ({k: v for k, v in value.items() if isinstance(v, torch.Tensor)},
                {k: v for k, v in value.items() if not isinstance(v, torch.Tensor)})
    if socket_type == "CONDITIONING":
        fields, meta = {}, []
        for i, (cond, options) in enumerate(value):
            fields[f"{i}.cond"] = cond
            fields.update({f"{i}.{k}": v for k, v in options.items() if isinstance(v, torch.Tensor)})
            meta.append({k: v for k, v in options.items() if not isinstance(v, torch.Tensor)})
        return fields, meta
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"a {socket_type} value is not a tensor but a {type(value).__name__}")
    return {"value": value}, None


def unflatten(socket_type: str, fields: dict[str, torch.Tensor], meta: Any = None) -> Any:
    """Inverse of ``flatten`` (fields may be a subset, e.g. only a LATENT's ``samples``)."""
    if socket_type == "LATENT":
        return {**(meta or {}), **fields}
    if socket_type == "CONDITIONING":
        entries: dict[int, dict] = {}
        for name, tensor in fields.items():
            index, key = name.split(".", 1)
            entries.setdefault(int(index), {})[key] = tensor
        return [[parts.pop("cond"), {**(meta[i] if meta else {}), **parts}]
                for i, parts in sorted(entries.items())]
    return fields["value"]


def controls(options: dict[str, list[dict]]) -> list:
    """The ControlNets (``kiln.nodes.models.controlnet.Control``) of conditioning entries'
    options, and the ones they chain, once each."""
    found: dict[int, object] = {}
    for entries in options.values():
        for entry in entries or ():
            control = entry.get("control") if isinstance(entry, dict) else None
            while control is not None:
                found.setdefault(id(control), control)
                control = control.previous
    return list(found.values())


def bound_buffers(model, options: dict[str, list[dict]], bindings) -> dict[str, list[tuple[Any, str]]]:
    """env name -> the (Tensors, buffer) places it replaces, for the ``bindings``
    (``Binding``) this sampler's MODEL (IP-Adapter embeds) and conditioning
    entries (ControlNet hints, chained ones included) reach, in binding order."""
    reached = {id(patch.embeds) for patch in model.ip_adapters}
    reached.update(id(control.source) for control in controls(options))
    out: dict[str, list] = {}
    for binding in bindings:
        if id(binding.module) in reached:
            out.setdefault(binding.env, []).append((binding.module, binding.buffer))
    return out


def node_def(class_type: str) -> NodeDef | None:
    """The catalogue's definition, or the plan-only 8-bit conversion's."""
    return IMAGE_TO_UINT8 if class_type == IMAGE_TO_UINT8.class_type else registry.get(class_type)


def chain_members(stage: Stage, handles: dict[str, tuple]) -> list[tuple[Node, NodeDef, dict[str, Any]]]:
    """``(node, definition, resolved inputs)`` per member of a module stage, for
    ``build_chain(members, outputs)``.

    The stage's forward takes its tensors in ``stage.inputs`` order; stage-local input names are
    ``<node>.<slot>.<field>`` for linked values and ``<node>.<input>`` for runtime widgets. It
    returns the tensors ``outputs`` (= list(stage.outputs)) names, ``<node>.<slot>.<field>`` of
    its last member (``unflatten``/``flatten`` convert between tensors and socket values).
    """
    position = {name: i for i, name in enumerate(stage.inputs)}
    in_chain = {member.id for member in stage.members}
    out = []
    for member in stage.members:
        definition = node_def(member.class_type)
        resolved: dict[str, Any] = {}
        for spec in definition.inputs:
            if spec.name not in member.inputs:
                continue
            value = member.inputs[spec.name]
            if isinstance(value, Link):
                if value.node_id in in_chain:
                    resolved[spec.name] = value
                elif spec.type in MODEL_TYPES:
                    resolved[spec.name] = handles[value.node_id][value.slot]
                else:
                    prefix = f"{value.node_id}.{value.slot}."
                    resolved[spec.name] = StageInput(spec.type, {
                        name[len(prefix):]: i for name, i in position.items() if name.startswith(prefix)})
            elif f"{member.id}.{spec.name}" in position:
                resolved[spec.name] = StageInput(spec.type, {"value": position[f"{member.id}.{spec.name}"]})
            else:
                resolved[spec.name] = value
        out.append((member, definition, resolved))
    return out
