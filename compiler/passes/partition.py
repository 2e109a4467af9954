"""Stage partition: every run-time node becomes a stage of the kind its plan spec names."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from kiln.compiler.graph import Link, Node
from kiln.compiler.stages import MODEL_TYPES, Compilation, EnvValue, Stage, bound_buffers, node_def
from kiln.kernels.errors import KilnError, Problem
from kiln.kernels.prompt_syntax import EMBEDDING_PREFIX
from kiln.kernels.sdxl import SIZE_OPTIONS
from kiln.nodes import registry
from kiln.nodes.image import IMAGE_TO_UINT8
from kiln.runtime import env
from kiln.runtime.image_loading import read_image
from kiln.runtime.kinds.sample import BOUND_PREFIX
from kiln.runtime.manifest import RuntimeInput

# SDXL conditioning options that only feed its size embedding (the runtime builds ``y``).
SDXL_SIZE_OPTIONS = frozenset(SIZE_OPTIONS)


def partition_stages(c: Compilation) -> Compilation:
    """One stage per run-time node, in execution order, of the kind its ``PlanSpec`` names.

    ``sample`` (KSampler, KSamplerAdvanced); ``empty_latent`` (EmptyLatentImage with a runtime
    size); ``save_image`` (SaveImage, PreviewImage) after a ``module`` converting to 8-bit pixels;
    ``module`` for every other plan-capable node (VAE decode/encode, model upscale, resizes, and
    CLIPTextEncode with a runtime text, the text first through a ``tokenize`` stage); ``lora``
    first, for each LoRA applied at run time (``runtime_loras``); ``load_image`` for a LoadImage
    with a runtime file name, and a ``module`` stage per bind node computing the tensors its
    run-time images give (``bindings``), which the sample stages reaching them take as
    ``bound.<env>`` inputs.

    Guarantees: every stage input names a runtime input, a constant or an output of an earlier
    stage; constant widgets are ``params`` (spelled as in the workflow), runtime ones ``inputs``;
    ``values`` says where each socket value lives at run time; constants and module outputs are
    only those some stage reads (an SD1 prompt's pooled output is neither stored nor computed).
    Anything else that must run at run time (nodes without a plan spec, runtime inputs the spec
    does not list, conditioning the denoiser cannot take, UNets with other extra channels than
    inpainting's) is refused naming the node, its class_type, the input and what is supported.
    """
    _check_supported(c)
    builder = _Partition(c)
    for node in c.runtime_loras:
        builder.add(node)
    bind = {b.node_id for b in c.bindings}
    for node_id in c.graph.topological_order():
        if node_id in c.runtime_nodes or node_id in bind:
            builder.add(c.graph.nodes[node_id])
    constants = {**c.constants, **builder.constants}
    read = {name for stage in builder.stages for name in stage.inputs.values()}
    stages = [_read_outputs(s, read) for s in builder.stages]
    kept = {name: value for name, value in constants.items() if name in read}
    folded = tuple({**f, "outputs": [name for name in f["outputs"] if name in kept]} for f in c.folded)
    return replace(c, stages=tuple(stages), values=builder.values, constants=kept, folded=folded)


def _read_outputs(stage: Stage, read: set[str]) -> Stage:
    """A module or load_image stage gives only the outputs some stage reads."""
    if stage.kind not in ("module", "load_image"):
        return stage
    outputs = {k: name for k, name in stage.outputs.items() if name in read}
    params = stage.params
    if stage.kind == "load_image":
        params = {**params, "shapes": {k: v for k, v in params["shapes"].items() if k in outputs}}
    return replace(stage, outputs=outputs, params=params)


def _plan_nodes() -> dict[str, registry.PlanSpec]:
    """The plan-capable nodes, samplers first (the order messages list them in)."""
    specs = {class_type: d.plan for class_type, d in registry.all_nodes().items() if d.plan is not None}
    return dict(sorted(specs.items(), key=lambda item: (registry.PLAN_KINDS.index(item[1].kind), item[0])))


def _check_supported(c: Compilation) -> None:
    problems = []
    specs = _plan_nodes()
    runtime_inputs = {(i.node_id, i.input_name): i for i in c.inputs}
    for node_id in c.runtime_nodes:
        node = c.graph.nodes[node_id]
        spec = specs.get(node.class_type)
        allowed = spec.runtime_widgets if spec is not None else {}
        for (input_node, input_name), runtime_input in runtime_inputs.items():
            if input_node == node_id and input_name not in allowed:
                problems.append(Problem(
                    "unsupported_runtime_input", "a compiled plan cannot take this input at run time",
                    node_id=node_id, class_type=node.class_type, title=node.title, input_name=input_name,
                    expected=_runtime_widget_list(specs), found=f"--input {runtime_input.name}"))
        if spec is not None and spec.kind == "bind" and not any(p.node_id == node_id for p in problems):
            late = [f"{name} reads node {link.node_id} ({c.graph.nodes[link.node_id].class_type})"
                    for name, link in node.links() if link.node_id in c.runtime_nodes and name not in spec.sockets]
            problems.append(Problem(
                "unsupported_node", f"{node.class_type} is evaluated when the plan is compiled; only its "
                f"{', '.join(spec.sockets)} may be run-time values", node_id=node_id, class_type=node.class_type,
                title=node.title, input_name=late[0].split(" ")[0] if late else None,
                expected="constant inputs besides " + ", ".join(spec.sockets),
                found="; ".join(late) or _why_runtime(c, node)))
        if spec is None and not any(p.node_id == node_id for p in problems):
            problems.append(Problem(
                "unsupported_node", f"{node.class_type} would run at run time ({_why_runtime(c, node)}), "
                "which compiled plans do not support", node_id=node_id, class_type=node.class_type,
                title=node.title, expected="at run time: " + ", ".join(specs)
                + "; any other node must have only constant inputs (it is then folded)",
                found=node.class_type))
    if problems:
        raise KilnError(problems)


def _runtime_widget_list(specs: dict[str, registry.PlanSpec]) -> str:
    return "one of " + ", ".join(f"{class_type}.{name}" for class_type, spec in specs.items()
                                 for name in spec.runtime_widgets)


def _why_runtime(c: Compilation, node: Node) -> str:
    for name, link in node.links():
        if link.node_id in c.runtime_nodes:
            return f"input {name!r} reads node {link.node_id} ({c.graph.nodes[link.node_id].class_type})"
    return "it cannot be evaluated at compile time"


class _Partition:
    """Walks the run-time nodes, tracking where each socket value lives at run time."""

    def __init__(self, c: Compilation):
        self.c = c
        self.values: dict[Link, EnvValue] = dict(c.values)
        self.inputs: dict[tuple[str, str], RuntimeInput] = {(i.node_id, i.input_name): i for i in c.inputs}
        self.stages: list[Stage] = []
        self.constants: dict[str, torch.Tensor] = {}

    def add(self, node: Node) -> None:
        definition = registry.get(node.class_type)
        {"sample": self._sample, "empty_latent": self._empty_latent, "save_image": self._save,
         "module": self._module, "lora": self._lora, "load_image": self._load_image,
         "bind": self._bind}[definition.plan.kind](node, definition)

    def _refuse(self, node: Node, input_name: str | None, message: str, expected: str, found: str):
        raise KilnError([Problem("unsupported_input", message, node_id=node.id, class_type=node.class_type,
                                 title=node.title, input_name=input_name, expected=expected, found=found)])

    def _widgets(self, node: Node, definition: registry.NodeDef) -> tuple[dict, dict[str, str]]:
        """(constant widget values by local name, runtime widget env names by local name)."""
        names = definition.plan.runtime_widgets
        constants, runtime = {}, {}
        for spec in definition.inputs:
            if not spec.is_widget:
                continue
            local = names.get(spec.name, spec.name)
            runtime_input = self.inputs.get((node.id, spec.name))
            if runtime_input is not None:
                runtime[local] = runtime_input.env
            else:
                constants[local] = node.inputs.get(spec.name, spec.default)
        return constants, runtime

    def _sample(self, node: Node, definition: registry.NodeDef) -> None:
        model = self._handle(node.inputs["model"])
        channels = model.latent_format.channels
        if model.in_channels not in (channels, 2 * channels + 1):
            self._refuse(node, "model", "plans take UNets with the latent's channels, or an inpainting UNet's "
                         "extra mask and image channels", f"{channels} or {2 * channels + 1} input channels",
                         str(model.in_channels))
        latent = self.values[node.inputs["latent_image"]]
        inputs = {"latent": latent.fields["samples"]}
        if "noise_mask" in latent.fields:
            inputs["noise_mask"] = latent.fields["noise_mask"]
        sdxl, guided = {}, not all(self._is_single_entry(self.values[node.inputs[side]], model)
                                   for side in ("positive", "negative"))
        if guided:
            inputs.update(self._guided_inputs(node, model))
        for side, local in () if guided else (("positive", "cond"), ("negative", "uncond")):
            cond = self.values[node.inputs[side]]
            inputs[f"{local}_context"] = cond.fields["0.cond"]
            if model.arch == "sdxl":
                if "0.pooled_output" not in cond.fields:
                    self._refuse(node, side, "SDXL conditioning needs a pooled output", "pooled_output",
                                 "conditioning without one")
                inputs[f"{local}_pooled"] = cond.fields["0.pooled_output"]
                sdxl[f"{local}_options"] = dict(cond.meta[0])
        options = {side: self.values[node.inputs[side]].meta for side in ("positive", "negative")}
        inputs.update({f"{BOUND_PREFIX}{name}": name for name in bound_buffers(model, options, self.c.bindings)})
        widgets, runtime = self._widgets(node, definition)
        params = {**widgets, **definition.plan.params, "prediction": model.model_sampling.prediction,
                  "scale_factor": model.latent_format.scale_factor, "latent_channels": channels}
        if sdxl:
            params["sdxl"] = {"embed_dim": model.info.adm_embed_dim, **sdxl}
        if model.in_channels != channels:
            params["inpaint"] = True
        if guided:
            params["guided"] = True
        if (latent.meta or {}).get("batch_index") is not None:
            params["batch_index"] = list(latent.meta["batch_index"])
        out = env.value_env(node.id, 0, "samples")
        self.stages.append(Stage(f"sample_{node.id}", "sample", [node.id], {**inputs, **runtime},
                                 {"samples": out}, params))
        self.values[Link(node.id, 0)] = EnvValue("LATENT", {**latent.fields, "samples": out}, latent.meta)

    @staticmethod
    def _is_single_entry(cond: EnvValue, model) -> bool:
        """One full-area entry (SDXL may carry its size options): the denoiser's inputs are then
        the two contexts, which may be runtime values."""
        allowed = SDXL_SIZE_OPTIONS if model.arch == "sdxl" else frozenset()
        return (len(cond.meta) == 1 and not set(cond.fields) - {"0.cond", "0.pooled_output"}
                and not set(cond.meta[0]) - allowed)

    def _guided_inputs(self, node: Node, model) -> dict[str, str]:
        """Several entries, areas, masks or strengths on a side: the denoiser then runs the
        guider's batching on them (``compiler/lower/denoiser.py: GuidedDenoiser``), which needs
        every conditioning tensor to be a constant, no timestep ranges and no inpainting UNet.
        Returns ``<side>.<entry>.<field>`` -> constant env name for every tensor."""
        inputs = {}
        for side in ("positive", "negative"):
            cond = self.values[node.inputs[side]]
            runtime = sorted(name for name in cond.fields.values() if name not in self.c.constants)
            timed = sorted({k for entry in cond.meta for k in ("start_percent", "end_percent") if k in entry})
            if runtime or timed or model.in_channels != model.latent_format.channels:
                found = (f"runtime values {', '.join(runtime)}" if runtime else
                         f"options {', '.join(timed)}" if timed else "an inpainting UNet")
                self._refuse(node, side, "several conditioning entries, areas or masks compile only with constant "
                             "prompts, no timestep ranges and a UNet without inpainting channels",
                             "constant conditioning without start/end percent", found)
            inputs.update({f"{side}.{field}": name for field, name in cond.fields.items()})
        return inputs

    def _lora(self, node: Node, definition: registry.NodeDef) -> None:
        """A LoRA applied when the plan runs (the runtime_loras pass took it out of the graph):
        ``model``/``clip`` name the loader outputs whose weights it patches (lora.json groups)."""
        widgets, runtime = self._widgets(node, definition)
        sources = {name: f"{link.node_id}.{link.slot}" for name in ("model", "clip")
                   if isinstance(link := node.inputs.get(name), Link)}
        self.stages.append(Stage(f"lora_{node.id}", "lora", [node.id], runtime, {},
                                 {**widgets, **definition.plan.params, **sources}))

    def _load_image(self, node: Node, definition: registry.NodeDef) -> None:
        """The file read at run time; ``shapes`` are those of the workflow's image (lowering frees
        the dims the compiled stages after it take at any size)."""
        _, runtime = self._widgets(node, definition)
        default = self.inputs[(node.id, "image")].default
        try:
            image, mask = read_image(Path(self.c.options.input_dir or ".") / default)
        except OSError as error:
            self._refuse(node, "image", f"the workflow's image gives the plan its sizes but cannot be read: {error}",
                         "an image file in the input folder (--input-dir)", repr(default))
        outputs = {"image": env.value_env(node.id, 0, "value"), "mask": env.value_env(node.id, 1, "value")}
        self.stages.append(Stage(f"load_image_{node.id}", "load_image", [node.id], runtime, outputs,
                                 {"shapes": {"image": list(image.shape), "mask": list(mask.shape)}}))
        self.values[Link(node.id, 0)] = EnvValue("IMAGE", {"value": outputs["image"]})
        self.values[Link(node.id, 1)] = EnvValue("MASK", {"value": outputs["mask"]})

    def _bind(self, node: Node, definition: registry.NodeDef) -> None:
        """The module computing what a bind node's run-time images give (its value stays the
        compile-time one, whose bound buffers the sample stages replace by these)."""
        sockets = definition.plan.sockets
        inputs = self._tensor_inputs(node, sockets)
        outputs = [env.value_env(node.id, 0, field) for field in definition.plan.computes
                   if any(b.env == env.value_env(node.id, 0, field) for b in self.c.bindings)]
        self.stages.append(Stage(f"module_{node.id}", "module", [node.id], inputs, {name: name for name in outputs},
                                 {}, members=[node]))

    def _empty_latent(self, node: Node, definition: registry.NodeDef) -> None:
        widgets, runtime = self._widgets(node, definition)
        out = env.value_env(node.id, 0, "samples")
        self.stages.append(Stage(f"empty_latent_{node.id}", "empty_latent", [node.id], runtime, {"samples": out},
                                 {**definition.plan.params, **widgets}))
        self.values[Link(node.id, 0)] = EnvValue("LATENT", {"samples": out}, {})

    def _save(self, node: Node, definition: registry.NodeDef) -> None:
        """The 8-bit conversion as a module stage (it fuses into the final decode), then the save."""
        widgets, _ = self._widgets(node, definition)
        pixels = env.value_env(node.id, 0, "value")
        convert = Node(node.id, IMAGE_TO_UINT8.class_type, {"images": node.inputs["images"]}, node.title)
        self.stages.append(Stage(f"module_{node.id}", "module", [node.id], self._tensor_inputs(convert),
                                 {pixels: pixels}, {}, members=[convert]))
        self.stages.append(Stage(f"save_{node.id}", "save_image", [node.id], {"images": pixels}, {},
                                 {**widgets, **definition.plan.params, "node_id": node.id}))

    def _module(self, node: Node, definition: registry.NodeDef) -> None:
        out_type, computed = definition.outputs[0], definition.plan.computes
        _, runtime = self._widgets(node, definition)
        for local, name in runtime.items():
            if definition.input(local) is not None and definition.input(local).type == "STRING":
                runtime[local] = self._tokenize(node, definition, local, name)
        fields = {field: env.value_env(node.id, 0, field) for field in computed}
        meta = {"CONDITIONING": [{}], "LATENT": {}}.get(out_type)
        for spec in definition.inputs:
            source = node.inputs.get(spec.name)
            if out_type == "LATENT" and spec.type == "LATENT" and isinstance(source, Link):
                carried = self.values[source]
                fields, meta = {**carried.fields, **fields}, carried.meta
        inputs = {**self._tensor_inputs(node), **{f"{node.id}.{local}": name for local, name in runtime.items()}}
        outputs = [env.value_env(node.id, 0, field) for field in computed]
        self.stages.append(Stage(f"module_{node.id}", "module", [node.id], inputs, {name: name for name in outputs},
                                 {}, members=[node]))
        self.values[Link(node.id, 0)] = EnvValue(out_type, fields, meta)

    def _tokenize(self, node: Node, definition: registry.NodeDef, input_name: str, text: str) -> str:
        """A ``tokenize`` stage for a runtime prompt (tokens for each encoder of the CLIP the node
        reads, which differ only in padding); returns the tokens' env name."""
        clip_input = next(spec.name for spec in definition.inputs if spec.type == "CLIP")
        clip = self._handle(node.inputs[clip_input])
        default = self.inputs[(node.id, input_name)].default
        if EMBEDDING_PREFIX in default:
            self._refuse(node, input_name, "a runtime prompt cannot use textual-inversion embeddings (the plan "
                         "tokenizes it without the embeddings folders)", "a prompt without 'embedding:'",
                         repr(default))
        tokens = env.tokens_env(node.id)
        pad_tokens = [encoder.spec.pad_token for encoder in clip.encoders.values()]
        self.stages.append(Stage(f"tokenize_{node.id}", "tokenize", [node.id], {"text": text},
                                 {"tokens": tokens}, {"pad_tokens": pad_tokens}))
        return tokens

    def _tensor_inputs(self, node: Node, only: tuple[str, ...] | None = None) -> dict[str, str]:
        """Linked data inputs (of the sockets ``only`` names, if given) as ``<node>.<slot>.<field>``
        -> env (a LATENT contributes its samples only)."""
        inputs = {}
        for spec in node_def(node.class_type).inputs:
            if only is not None and spec.name not in only:
                continue
            source = node.inputs.get(spec.name)
            if isinstance(source, Link) and spec.type not in MODEL_TYPES:
                for field, name in self.values[source].fields.items():
                    if spec.type != "LATENT" or field == "samples":
                        inputs[env.value_env(source.node_id, source.slot, field)] = name
        return inputs

    def _handle(self, link: Link):
        return self.c.handles[link.node_id][link.slot]
