"""Stage partition: every run-time node becomes a stage of the kind the runtime executes."""
from __future__ import annotations

from dataclasses import replace

import torch

from kiln.compiler.errors import KilnError, Problem
from kiln.compiler.graph import Link, Node
from kiln.compiler.stages import MODEL_TYPES, TO_UINT8, Compilation, EnvValue, RuntimeInput, Stage, node_def
from kiln.kernels.prompt_syntax import EMBEDDING_PREFIX
from kiln.kernels.sdxl import SIZE_OPTIONS
from kiln.nodes import registry

# Widgets a run-time node may take as runtime inputs -> their stage-local names.
RUNTIME_WIDGETS = {
    "KSampler": {"seed": "seed", "steps": "steps", "cfg": "cfg", "denoise": "denoise"},
    "KSamplerAdvanced": {"noise_seed": "seed", "steps": "steps", "cfg": "cfg", "start_at_step": "start_at_step",
                         "end_at_step": "end_at_step"},
    "EmptyLatentImage": {"width": "width", "height": "height", "batch_size": "batch_size"},
    "CLIPTextEncode": {"text": "text"},
}
# Nodes that run as module stages: output type and the tensor fields the module computes
# (a LATENT output carries the other fields of the node's LATENT input over, as ComfyUI's dict copy).
MODULE_OUTPUTS = {
    "VAEDecode": ("IMAGE", ("value",)),
    "VAEEncode": ("LATENT", ("samples",)),
    "ImageUpscaleWithModel": ("IMAGE", ("value",)),
    "ImageScale": ("IMAGE", ("value",)),
    "ImageScaleBy": ("IMAGE", ("value",)),
    "LatentUpscale": ("LATENT", ("samples",)),
    "LatentUpscaleBy": ("LATENT", ("samples",)),
    "CLIPTextEncode": ("CONDITIONING", ("0.cond", "0.pooled_output")),
}
SAMPLERS = ("KSampler", "KSamplerAdvanced")
RUNTIME_NODES = (*SAMPLERS, "EmptyLatentImage", "SaveImage", "PreviewImage", *MODULE_OUTPUTS)
# EmptyLatentImage always makes 4 channels; the sampler widens an empty latent for other models.
EMPTY_LATENT_CHANNELS = 4
# SDXL conditioning options that only feed its size embedding (the runtime builds ``y``).
SDXL_SIZE_OPTIONS = frozenset(SIZE_OPTIONS)


def partition_stages(c: Compilation) -> Compilation:
    """One stage per run-time node, in execution order.

    KSampler/KSamplerAdvanced -> ``sample``; EmptyLatentImage with a runtime size ->
    ``empty_latent``; SaveImage / PreviewImage -> a ``module`` converting to 8-bit pixels plus a
    ``save_image`` (``preview`` for the latter);
    VAEDecode, VAEEncode, ImageUpscaleWithModel, ImageScale(By), LatentUpscale(By) and
    CLIPTextEncode with a runtime text -> one ``module`` each, the text first through a
    ``tokenize`` stage.

    Guarantees: every stage input names a runtime input, a constant or an output of an earlier
    stage; constant widgets are ``params`` (spelled as in the workflow), runtime ones ``inputs``;
    ``values`` says where each socket value lives at run time; constants and module outputs are
    only those some stage reads (an SD1 prompt's pooled output is neither stored nor computed).
    Anything else that must run at run time (other node types, runtime inputs the stage cannot
    take, conditioning beyond one full-area entry per side, UNets with other extra channels than
    inpainting's) is refused naming the node, its class_type, the input and what is supported.
    """
    _check_supported(c)
    builder = _Partition(c)
    for node_id in c.runtime_nodes:
        builder.add(c.graph.nodes[node_id])
    constants = {**c.constants, **builder.constants}
    read = {env for stage in builder.stages for env in stage.inputs.values()}
    stages = [replace(s, outputs={k: env for k, env in s.outputs.items() if env in read}) if s.kind == "module"
              else s for s in builder.stages]
    kept = {name: value for name, value in constants.items() if name in read}
    folded = tuple({**f, "outputs": [env for env in f["outputs"] if env in kept]} for f in c.folded)
    return replace(c, stages=tuple(stages), values=builder.values, constants=kept, folded=folded)


def _check_supported(c: Compilation) -> None:
    problems = []
    runtime_inputs = {(i.node_id, i.input_name): i for i in c.inputs}
    for node_id in c.runtime_nodes:
        node = c.graph.nodes[node_id]
        allowed = RUNTIME_WIDGETS.get(node.class_type, {})
        for (input_node, input_name), runtime_input in runtime_inputs.items():
            if input_node == node_id and input_name not in allowed:
                problems.append(Problem(
                    "unsupported_runtime_input", "a compiled plan cannot take this input at run time",
                    node_id=node_id, class_type=node.class_type, title=node.title, input_name=input_name,
                    expected=_runtime_widget_list(), found=f"--input {runtime_input.name}"))
        if node.class_type not in RUNTIME_NODES and not any(p.node_id == node_id for p in problems):
            problems.append(Problem(
                "unsupported_node", f"{node.class_type} would run at run time ({_why_runtime(c, node)}), "
                "which compiled plans do not support", node_id=node_id, class_type=node.class_type,
                title=node.title, expected="at run time: " + ", ".join(RUNTIME_NODES)
                + "; any other node must have only constant inputs (it is then folded)",
                found=node.class_type))
    if problems:
        raise KilnError(problems)


def _runtime_widget_list() -> str:
    return "one of " + ", ".join(f"{class_type}.{name}" for class_type, names in RUNTIME_WIDGETS.items()
                                 for name in names)


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
        if node.class_type in SAMPLERS:
            self._sample(node)
        elif node.class_type == "EmptyLatentImage":
            self._empty_latent(node)
        elif node.class_type in ("SaveImage", "PreviewImage"):
            self._save(node)
        else:
            self._module(node)

    def _refuse(self, node: Node, input_name: str | None, message: str, expected: str, found: str):
        raise KilnError([Problem("unsupported_input", message, node_id=node.id, class_type=node.class_type,
                                 title=node.title, input_name=input_name, expected=expected, found=found)])

    def _widgets(self, node: Node) -> tuple[dict, dict[str, str]]:
        """(constant widget values by local name, runtime widget env names by local name)."""
        names = RUNTIME_WIDGETS.get(node.class_type, {})
        constants, runtime = {}, {}
        for spec in registry.get(node.class_type).inputs:
            if not spec.is_widget:
                continue
            local = names.get(spec.name, spec.name)
            runtime_input = self.inputs.get((node.id, spec.name))
            if runtime_input is not None:
                runtime[local] = runtime_input.env
            else:
                constants[local] = node.inputs.get(spec.name, spec.default)
        return constants, runtime

    def _sample(self, node: Node) -> None:
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
        widgets, runtime = self._widgets(node)
        params = {"advanced": node.class_type == "KSamplerAdvanced", **widgets,
                  "prediction": model.model_sampling.prediction, "scale_factor": model.latent_format.scale_factor}
        if sdxl:
            params["sdxl"] = {"embed_dim": model.info.adm_embed_dim, **sdxl}
        if model.in_channels != channels:
            params["inpaint"] = True
        if guided:
            params["guided"] = True
        if (latent.meta or {}).get("batch_index") is not None:
            params["batch_index"] = list(latent.meta["batch_index"])
        out = f"{node.id}.0.samples"
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
            runtime = sorted(env for env in cond.fields.values() if env not in self.c.constants)
            timed = sorted({k for entry in cond.meta for k in ("start_percent", "end_percent") if k in entry})
            if runtime or timed or model.in_channels != model.latent_format.channels:
                found = (f"runtime values {', '.join(runtime)}" if runtime else
                         f"options {', '.join(timed)}" if timed else "an inpainting UNet")
                self._refuse(node, side, "several conditioning entries, areas or masks compile only with constant "
                             "prompts, no timestep ranges and a UNet without inpainting channels",
                             "constant conditioning without start/end percent", found)
            inputs.update({f"{side}.{field}": env for field, env in cond.fields.items()})
        return inputs

    def _empty_latent(self, node: Node) -> None:
        widgets, runtime = self._widgets(node)
        out = f"{node.id}.0.samples"
        self.stages.append(Stage(f"empty_latent_{node.id}", "empty_latent", [node.id], runtime, {"samples": out},
                                 {"channels": EMPTY_LATENT_CHANNELS, **widgets}))
        self.values[Link(node.id, 0)] = EnvValue("LATENT", {"samples": out}, {})

    def _save(self, node: Node) -> None:
        widgets, _ = self._widgets(node)
        source = node.inputs["images"]
        pixels = f"{node.id}.0.value"
        convert = Node(node.id, TO_UINT8.class_type, {"images": source}, node.title)
        self.stages.append(Stage(f"module_{node.id}", "module", [node.id], self._tensor_inputs(convert),
                                 {pixels: pixels}, {}, members=[convert]))
        params = ({"preview": True} if node.class_type == "PreviewImage"
                  else {"filename_prefix": widgets["filename_prefix"]})
        self.stages.append(Stage(f"save_{node.id}", "save_image", [node.id], {"images": pixels}, {},
                                 {**params, "node_id": node.id}))

    def _module(self, node: Node) -> None:
        out_type, computed = MODULE_OUTPUTS[node.class_type]
        _, runtime = self._widgets(node)
        if "text" in runtime:
            runtime["text"] = self._tokenize(node, runtime["text"])
        fields = {name: f"{node.id}.0.{name}" for name in computed}
        meta = {"CONDITIONING": [{}], "LATENT": {}}.get(out_type)
        for spec in registry.get(node.class_type).inputs:
            source = node.inputs.get(spec.name)
            if out_type == "LATENT" and spec.type == "LATENT" and isinstance(source, Link):
                carried = self.values[source]
                fields, meta = {**carried.fields, **fields}, carried.meta
        inputs = {**self._tensor_inputs(node), **{f"{node.id}.{name}": env for name, env in runtime.items()}}
        self.stages.append(Stage(f"module_{node.id}", "module", [node.id], inputs,
                                 {env: env for env in (f"{node.id}.0.{name}" for name in computed)}, {},
                                 members=[node]))
        self.values[Link(node.id, 0)] = EnvValue(out_type, fields, meta)

    def _tokenize(self, node: Node, text_env: str) -> str:
        """A ``tokenize`` stage for CLIPTextEncode's runtime prompt (tokens for each of the CLIP's
        encoders, which differ only in padding); returns the tokens' env name."""
        clip = self._handle(node.inputs["clip"])
        default = self.inputs[(node.id, "text")].default
        if EMBEDDING_PREFIX in default:
            self._refuse(node, "text", "a runtime prompt cannot use textual-inversion embeddings (the plan "
                         "tokenizes it without the embeddings folders)", "a prompt without 'embedding:'",
                         repr(default))
        tokens = f"{node.id}.text.tokens"
        pad_tokens = [encoder.spec.pad_token for encoder in clip.encoders.values()]
        self.stages.append(Stage(f"tokenize_{node.id}", "tokenize", [node.id], {"text": text_env},
                                 {"tokens": tokens}, {"pad_tokens": pad_tokens}))
        return tokens

    def _tensor_inputs(self, node: Node) -> dict[str, str]:
        """Linked data inputs as ``<node>.<slot>.<field>`` -> env (a LATENT contributes its samples only)."""
        inputs = {}
        for spec in node_def(node.class_type).inputs:
            source = node.inputs.get(spec.name)
            if isinstance(source, Link) and spec.type not in MODEL_TYPES:
                for name, env in self.values[source].fields.items():
                    if spec.type != "LATENT" or name == "samples":
                        inputs[f"{source.node_id}.{source.slot}.{name}"] = env
        return inputs

    def _handle(self, link: Link):
        return self.c.handles[link.node_id][link.slot]
