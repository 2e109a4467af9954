"""The ComfyUI_IPAdapter_plus nodes kiln runs (``IPAdapterPlus.py``, commit 9d076a3), with their
names, inputs and defaults: IPAdapterModelLoader, IPAdapterUnifiedLoader, IPAdapter (the
pack's ``IPAdapterSimple``) and IPAdapterAdvanced. FaceID models (insightface) are refused."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from kiln.kernels.errors import InputError
from kiln.nodes.clip_vision import load_clip_vision_file
from kiln.nodes.loaders import load_once
from kiln.nodes.models.ipadapter import COMBINE_EMBEDS, EMBEDS_SCALING, WEIGHT_TYPES
from kiln.nodes.plan import NodeModule
from kiln.nodes.registry import COMBO, FLOAT, SOCKET, PlanSpec, RunContext, node

PRESETS = ("LIGHT - SD1.5 only (low strength)", "STANDARD (medium strength)", "VIT-G (medium strength)",
           "PLUS (high strength)", "PLUS FACE (portraits)", "FULL FACE - SD1.5 only (portraits stronger)")
SIMPLE_WEIGHT_TYPES = ("standard", "prompt is more important", "style transfer")
_ADVANCED_ONLY = ("clip_vision", "combine_embeds", "embeds_scaling", "image_negative")


@dataclass(eq=False)
class IPAdapterFile:
    """IPADAPTER from IPAdapterModelLoader: the file's ``image_proj`` / ``ip_adapter`` dicts."""

    model: dict
    name: str


@dataclass(eq=False)
class IPAdapterPipeline:
    """IPADAPTER from IPAdapterUnifiedLoader: the adapter and the CLIP vision it goes with."""

    ipadapter: IPAdapterFile
    clip_vision: object
    files: dict = field(default_factory=dict)   # {"ipadapter": name, "clipvision": name}


def _load_ipadapter(ctx: RunContext, name: str, input_name: str) -> IPAdapterFile:
    from kiln.nodes.models.checkpoint import ModelFileError, load_state_dict, read_torch_file
    from kiln.nodes.models.ipadapter import read_ipadapter

    path = ctx.models.resolve("ipadapter", name)
    safetensors = path.suffix.lower() in (".safetensors", ".sft")
    try:
        return load_once(ctx, ("ipadapter", str(path)), lambda: IPAdapterFile(read_ipadapter(
            load_state_dict(path) if safetensors else read_torch_file(path), safetensors, path.name), name))
    except ModelFileError as error:
        raise InputError(input_name, f"{name}: {error.message}", expected="an IP-Adapter model",
                         found=str(path)) from None


@node("IPAdapterModelLoader", [COMBO("ipadapter_file", (), folder="ipadapter")], ("IPADAPTER",),
      category="ipadapter/loaders", needs_context=True, display_name="IPAdapter Model Loader",
      python_module="custom_nodes.ComfyUI_IPAdapter_plus")
def ipadapter_model_loader(ctx: RunContext, ipadapter_file: str):
    return (_load_ipadapter(ctx, ipadapter_file, "ipadapter_file"),)


def _clipvision_pattern(preset: str) -> str:
    if preset.lower().startswith("vit-g"):
        return r"(ViT.bigG.14.*39B.b160k|ipadapter.*sdxl|sdxl.*model)\.(bin|safetensors)"
    return r"(ViT.H.14.*s32B.b79K|ipadapter.*sd15|sd1.?5.*model)\.(bin|safetensors)"


def _ipadapter_pattern(preset: str, is_sdxl: bool) -> str:
    """``get_ipadapter_file``'s file pattern for a preset (SDXL variants for SDXL models)."""
    p = preset.lower()
    if p.startswith("light"):
        if is_sdxl:
            raise InputError("preset", "light model is not supported for SDXL", expected="an SD1.5 MODEL",
                             found="an SDXL MODEL")
        return r"sd15.light.v11\.(safetensors|bin)$"
    if p.startswith("full"):
        if is_sdxl:
            raise InputError("preset", "full face model is not supported for SDXL", expected="an SD1.5 MODEL",
                             found="an SDXL MODEL")
        return r"full.face.sd15\.(safetensors|bin)$"
    table = {"standard": (r"ip.adapter.sd15", r"ip.adapter.sdxl.vit.h"), "vit-g": (r"sd15.vit.g", r"ip.adapter.sdxl"),
             "plus (": (r"ip.adapter.plus.sd15", r"plus.sdxl.vit.h"),
             "plus face": (r"plus.face.sd15", r"plus.face.sdxl.vit.h")}
    for start, (sd15, sdxl) in table.items():
        if p.startswith(start):
            return (sdxl if is_sdxl else sd15) + r"\.(safetensors|bin)$"
    raise InputError("preset", f"invalid type {preset!r}", expected=", ".join(PRESETS), found=preset)


def _first_match(ctx: RunContext, kind: str, pattern: str, what: str) -> str:
    names = ctx.models.list(kind)
    found = [n for n in names if re.search(pattern, n, re.IGNORECASE)]
    if not found:
        raise InputError("preset", f"{what} model not found.", expected=f"a file in {kind} matching {pattern}",
                         found=", ".join(names[:10]) or f"no files in {kind}")
    return found[0]


@node("IPAdapterUnifiedLoader", [SOCKET("model", "MODEL"), COMBO("preset", PRESETS),
                                 SOCKET("ipadapter", "IPADAPTER", optional=True)],
      ("MODEL", "IPADAPTER"), output_names=("model", "ipadapter"), category="ipadapter", needs_context=True,
      display_name="IPAdapter Unified Loader", python_module="custom_nodes.ComfyUI_IPAdapter_plus")
def ipadapter_unified_loader(ctx: RunContext, model, preset: str, ipadapter=None):
    """Finds the preset's CLIP vision and adapter files by the pack's patterns (first match)."""
    clip_name = _first_match(ctx, "clip_vision", _clipvision_pattern(preset), "ClipVision")
    adapter_name = _first_match(ctx, "ipadapter", _ipadapter_pattern(preset, model.arch == "sdxl"), "IPAdapter")
    reuse = ipadapter if isinstance(ipadapter, IPAdapterPipeline) else None
    clip_vision = reuse.clip_vision if reuse and reuse.files.get("clipvision") == clip_name else \
        load_clip_vision_file(ctx, clip_name, "preset")
    adapter = reuse.ipadapter if reuse and reuse.files.get("ipadapter") == adapter_name else \
        _load_ipadapter(ctx, adapter_name, "preset")
    return model, IPAdapterPipeline(adapter, clip_vision, {"clipvision": clip_name, "ipadapter": adapter_name})


def _simple_models(ipadapter) -> tuple[IPAdapterFile, object]:
    if not isinstance(ipadapter, IPAdapterPipeline):
        raise InputError("ipadapter", "IPAdapter model not present in the pipeline. Please load the models with "
                         "the IPAdapterUnifiedLoader node.", expected="IPAdapterUnifiedLoader's ipadapter output",
                         found="an IPAdapterModelLoader model (use IPAdapterAdvanced with a clip_vision input)")
    return ipadapter.ipadapter, ipadapter.clip_vision


def _advanced_models(ipadapter, clip_vision=None) -> tuple[IPAdapterFile, object]:
    if isinstance(ipadapter, IPAdapterPipeline):
        adapter, clip_vision = ipadapter.ipadapter, clip_vision if clip_vision is not None else ipadapter.clip_vision
    else:
        adapter = ipadapter
    if clip_vision is None:
        raise InputError("clip_vision", "Missing CLIPVision model.", expected="a CLIP_VISION input (CLIPVisionLoader) "
                         "or IPAdapterUnifiedLoader's pipeline", found="none")
    return adapter, clip_vision


class ReferenceTokens(NodeModule):
    """A plan's IP-Adapter tokens from run-time reference images (``reference_tokens``, as the
    node computes them); the denoiser reads them in place of the patch's embeds."""

    def __init__(self, node, model, adapter: IPAdapterFile, clip_vision, combine_embeds: str):
        from kiln.nodes.models.ipadapter import IPAdapterModule, adapter_kind

        super().__init__(node)
        self.kind = adapter_kind(adapter.model)
        self.clip_vision = clip_vision
        self.encoder = clip_vision.model            # so export finds the weights
        self.adapter = IPAdapterModule(adapter.model, self.kind).to(model.device, model.dtype)
        self.combine_embeds, self.device, self.dtype = combine_embeds, model.device, model.dtype

    def forward(self, image, image_negative=None):
        from kiln.nodes.models.ipadapter import reference_tokens

        cond, uncond = reference_tokens(self.clip_vision, self.adapter, self.kind, image, image_negative,
                                        self.combine_embeds, self.device, self.dtype)
        return {"ip_cond": cond, "ip_uncond": uncond}


def _new_embeds(inputs: dict, outputs: tuple) -> dict:
    """The embeds of the patch this node added (the model it was given may carry others)."""
    given = {id(patch) for patch in inputs["model"].ip_adapters}
    made = [patch for patch in outputs[0].ip_adapters if id(patch) not in given]
    return {"ip_cond": [(p.embeds, "cond") for p in made], "ip_uncond": [(p.embeds, "uncond") for p in made]}


def _reference_plan(models, sockets: tuple[str, ...], compile_only: tuple[str, ...] = ()) -> PlanSpec:
    """Reference images may be run-time values in a plan: their tokens are computed at run time."""
    def lower(node, w):
        adapter, clip_vision = models(w["ipadapter"], **({"clip_vision": w["clip_vision"]} if "clip_vision" in w
                                                        else {}))
        return ReferenceTokens(node, w["model"], adapter, clip_vision, w.get("combine_embeds", "concat"))
    return PlanSpec("bind", sockets=sockets, computes=("ip_cond", "ip_uncond"), lower=lower,
                    bound=_new_embeds, compile_only=compile_only)


def _apply(model, adapter: IPAdapterFile, clip_vision, image, **options):
    from kiln.nodes.models.detect import ModelFileError
    from kiln.nodes.models.ipadapter import prepare

    try:
        return model.with_ip_adapter(prepare(model, adapter.model, clip_vision, image, **options))
    except (ValueError, ModelFileError) as error:
        raise InputError("ipadapter", f"{adapter.name}: {error}", expected="an IP-Adapter for this model and "
                         "CLIP vision encoder", found=adapter.name) from None


def _simple_misuse(inputs: dict) -> str | None:
    """The hint for a graph that gives IPAdapter what IPAdapterAdvanced takes."""
    advanced = [name for name in _ADVANCED_ONLY if name in inputs]
    weight_type = inputs.get("weight_type")
    if advanced or (isinstance(weight_type, str) and weight_type not in SIMPLE_WEIGHT_TYPES):
        found = ", ".join(advanced + ([f"weight_type {weight_type!r}"] if weight_type not in SIMPLE_WEIGHT_TYPES
                                      else []))
        return (f"(this looks written for IPAdapterAdvanced: {found}. Use class_type IPAdapterAdvanced, or give "
                "IPAdapter its own inputs: weight, start_at, end_at and weight_type standard, 'prompt is more "
                "important' or 'style transfer', with the models from IPAdapterUnifiedLoader)")
    return None


@node("IPAdapter", [SOCKET("model", "MODEL"), SOCKET("ipadapter", "IPADAPTER"), SOCKET("image", "IMAGE"),
                    FLOAT("weight", 1.0, -1.0, 3.0, 0.05), FLOAT("start_at", 0.0, 0.0, 1.0, 0.001),
                    FLOAT("end_at", 1.0, 0.0, 1.0, 0.001), COMBO("weight_type", SIMPLE_WEIGHT_TYPES),
                    SOCKET("attn_mask", "MASK", optional=True)],
      ("MODEL",), category="ipadapter", display_name="IPAdapter", misuse_hint=_simple_misuse,
      python_module="custom_nodes.ComfyUI_IPAdapter_plus", plan=_reference_plan(_simple_models, ("image",)))
def ipadapter_simple(model, ipadapter, image, weight: float, start_at: float, end_at: float, weight_type: str,
                     attn_mask=None):
    """The pack's ``IPAdapterSimple``: the unified loader's pipeline, three weight curves."""
    adapter, clip_vision = _simple_models(ipadapter)
    curve = "style transfer" if weight_type.startswith("style") else \
        "ease out" if weight_type == "prompt is more important" else "linear"
    return (_apply(model, adapter, clip_vision, image, weight=weight, weight_type=curve,
                   combine_embeds="concat", start_at=start_at, end_at=end_at, embeds_scaling="V only",
                   attn_mask=attn_mask),)


@node("IPAdapterAdvanced", [SOCKET("model", "MODEL"), SOCKET("ipadapter", "IPADAPTER"), SOCKET("image", "IMAGE"),
                            FLOAT("weight", 1.0, -1.0, 5.0, 0.05), COMBO("weight_type", WEIGHT_TYPES),
                            COMBO("combine_embeds", COMBINE_EMBEDS), FLOAT("start_at", 0.0, 0.0, 1.0, 0.001),
                            FLOAT("end_at", 1.0, 0.0, 1.0, 0.001), COMBO("embeds_scaling", EMBEDS_SCALING),
                            SOCKET("image_negative", "IMAGE", optional=True),
                            SOCKET("attn_mask", "MASK", optional=True),
                            SOCKET("clip_vision", "CLIP_VISION", optional=True)], ("MODEL",), category="ipadapter",
      display_name="IPAdapter Advanced", python_module="custom_nodes.ComfyUI_IPAdapter_plus",
      plan=_reference_plan(_advanced_models, ("image", "image_negative"), ("clip_vision",)))
def ipadapter_advanced(model, ipadapter, image, weight: float, weight_type: str, combine_embeds: str,
                       start_at: float, end_at: float, embeds_scaling: str, image_negative=None, attn_mask=None,
                       clip_vision=None):
    adapter, clip_vision = _advanced_models(ipadapter, clip_vision)
    return (_apply(model, adapter, clip_vision, image, weight=weight, weight_type=weight_type,
                   combine_embeds=combine_embeds, start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling,
                   image_negative=image_negative, attn_mask=attn_mask),)
