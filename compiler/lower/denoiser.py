"""The sample stage's module: one CFG denoiser evaluation, exported and compiled as a whole.

It computes what ``kiln.nodes.guider.Guider`` computes for one full-area positive and one
full-area negative entry -- ComfyUI's ``calc_cond_batch`` + ``cfg_function`` -- with the
same float operations in the same order: ``calculate_input``, the nearest-timestep lookup,
one UNet call on the CFG batch ``[uncond, cond]``, ``calculate_denoised``, then
``uncond + (cond - uncond) * cfg``. (The guider's mask-weighted average reduces to the
prediction itself for full-area entries: ``0 + o*1`` divided by ``1 + 1e-37 == 1``.)
The sampler loop stays outside, in the runtime, so step math is the interpreter's.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from kiln.compiler.stages import controls, unflatten
from kiln.kernels.errors import KilnError, Problem
from kiln.nodes.guider import calc_cond_batch, prepare_conds

# diffusers' UNet passes the skip connection's size to its upsamplers only when the input is
# not a multiple of 2**num_upsamplers; that test is a guard torch.export cannot keep dynamic.
# A factor no latent reaches makes every upsampler take the size explicitly, which resizes to
# exactly 2x for even sizes (bit-identical to scale_factor=2) and handles odd sizes as ComfyUI does.
_ALWAYS_EXPLICIT_UPSAMPLE = 40

# Conditioning options that make the guider do more than one full-area prediction, with the
# value that means "off" (None: any value is refused).
_NEUTRAL_OPTIONS = {"area": None, "mask": None, "concat_latent_image": None, "concat_mask": None,
                    "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}


@contextlib.contextmanager
def _bound(places: dict[str, list[tuple[nn.Module, str]]], values: dict[str, torch.Tensor]):
    """The buffers hold the run-time tensors (the traced inputs, while exporting) for one call."""
    saved = []
    try:
        for name, targets in places.items():
            for module, buffer in targets:
                saved.append((module, buffer, module._buffers[buffer]))
                module._buffers[buffer] = values[name]
        yield
    finally:
        for module, buffer, tensor in reversed(saved):
            module._buffers[buffer] = tensor


def _held(places: dict[str, list[tuple[nn.Module, str]]]) -> set[int]:
    return {id(module) for targets in places.values() for module, _ in targets}


def exportable(model, bound: dict[str, list] | None = None):
    """The MODEL handle with a UNet whose upsamplers always take explicit sizes (see
    ``_ALWAYS_EXPLICIT_UPSAMPLE``); shares every parameter, only that attribute differs. Its
    IP-Adapter modules (which the UNet's attention processors call) become submodules, so
    export finds their weights, and so do their embeds unless run-time inputs replace them."""
    unet = copy.copy(model.unet)
    unet.num_upsamplers = _ALWAYS_EXPLICIT_UPSAMPLE
    view = copy.copy(model)
    view._modules = {**model._modules, "unet": unet}
    if model.ip_adapters:
        held = _held(bound or {})
        view._modules["ip_adapter_modules"] = nn.ModuleList(patch.module for patch in model.ip_adapters)
        view._modules["ip_adapter_embeds"] = nn.ModuleList(patch.embeds for patch in model.ip_adapters
                                                           if id(patch.embeds) not in held)
    return view


class Denoiser(nn.Module):
    """``forward(x, sigma, cond_context, uncond_context, cfg[, cond_y, uncond_y][, c_concat])`` ->
    ``(denoised, uncond_denoised)``: ``y`` for SDXL, ``c_concat`` (mask and masked latent image,
    kiln.kernels.inpaint) for inpainting UNets, in that order (``inputs`` names them). With
    ``cfg == 1`` at build time only the positive side runs and ``uncond_denoised`` is zeros
    (ComfyUI's cfg1 shortcut). The UNet call is the MODEL's own ``apply_model``. ``bound``
    (``bound_buffers``, keyed by input name): inputs after the ys that replace buffers."""

    def __init__(self, model, cfg: float | None, bound: dict[str, list] | None = None):
        super().__init__()
        self.bound = dict(bound or {})
        self.model = exportable(model, self.bound)
        self.skip_uncond = cfg is not None and math.isclose(cfg, 1.0)
        self.with_y = model.arch == "sdxl"
        self.with_concat = model.in_channels != model.latent_format.channels
        self.inputs = (("x", "sigma", "cond_context", "uncond_context", "cfg")
                       + (("cond_y", "uncond_y") if self.with_y else ()) + tuple(self.bound)
                       + (("c_concat",) if self.with_concat else ()))

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        args = dict(zip(self.inputs, tensors, strict=True))
        with _bound(self.bound, args):
            return self._denoise(args)

    def _denoise(self, args: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, sigma, cfg, c_concat = args["x"], args["sigma"], args["cfg"], args.get("c_concat")
        batch = x.shape[0]
        sides = ("cond",) if self.skip_uncond else ("uncond", "cond")
        contexts = [args[f"{side}_context"].expand(batch, -1, -1) for side in sides]
        ys = [args[f"{side}_y"].expand(batch, -1) for side in sides] if self.with_y else [None] * len(sides)
        lengths = [c.shape[1] for c in contexts]
        apply_model = self.model.apply_model
        if len(sides) == 2 and all(isinstance(n, int) for n in lengths) and lengths[0] != lengths[1]:
            # Prompts of different chunk counts (lengths known at compile time): ComfyUI repeats
            # both to their LCM when that is at most 4x the shorter, else runs them separately.
            lcm = math.lcm(*lengths)
            if lcm // min(lengths) > 4:
                out = torch.cat([apply_model(x, sigma, c, y, c_concat, cond_or_uncond=(slot,))
                                 for c, y, slot in zip(contexts, ys, (1, 0))])
                return self._combine(out, batch, cfg)
            contexts = [c.repeat(1, lcm // c.shape[1], 1) for c in contexts]
        n = len(sides)
        out = apply_model(torch.cat([x] * n), torch.cat([sigma] * n), torch.cat(contexts),
                          torch.cat(ys) if self.with_y else None,
                          None if c_concat is None else torch.cat([c_concat] * n),
                          cond_or_uncond=(0,) if self.skip_uncond else (1, 0))
        return self._combine(out, batch, cfg)

    def _combine(self, out: torch.Tensor, batch: int, cfg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_uncond:
            return out, torch.zeros_like(out)
        uncond, cond = out[:batch], out[batch:]
        return uncond + (cond - uncond) * cfg, uncond


class GuidedDenoiser(Denoiser):
    """``forward(x, sigma, cfg, *conditioning tensors)`` -> ``(denoised, uncond_denoised)`` for
    conditioning the plain denoiser does not take: several entries per side, areas, masks,
    strengths, ControlNets (their modules become submodules; a start/end window is a select on
    sigma). It runs
    the interpreter's own ``prepare_conds`` + ``calc_cond_batch`` (areas
    resolved, masks resized, entries batched as ComfyUI batches them) at the concrete latent size
    it is exported for, then the CFG combine. The tensors arrive as ``<side>.<entry>.<field>``
    inputs (plan constants); the options (area, strength, ...) are fixed here."""

    def __init__(self, model, cfg: float | None, options: dict[str, list[dict]], tensor_names: list[str],
                 bound: dict[str, list] | None = None):
        super().__init__(model, cfg, bound)
        self.options = options
        self.inputs = ("x", "sigma", "cfg", *tensor_names, *self.bound)
        # so export finds their weights (hints that run-time inputs replace are no weights)
        self.controls = nn.ModuleList(m for m in _control_modules(options) if id(m) not in _held(self.bound))

    def _denoise(self, args: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, sigma, cfg = args["x"], args["sigma"], args["cfg"]
        conds = {}
        for side, options in self.options.items():
            fields = {name[len(side) + 1:]: t for name, t in args.items() if name.startswith(side + ".")}
            conds[side] = unflatten("CONDITIONING", fields, options)
        prepared = prepare_conds(self.model, conds, x, x, None)
        negative = None if self.skip_uncond else prepared["negative"]
        cond, uncond = calc_cond_batch(self.model, [prepared["positive"], negative], x, sigma)
        if self.skip_uncond:
            return cond, torch.zeros_like(cond)
        return uncond + (cond - uncond) * cfg, uncond


def _control_modules(options: dict[str, list[dict]]) -> list[nn.Module]:
    """The ControlNet modules and hint holders the controls use, once each."""
    modules: dict[int, nn.Module] = {}
    for control in controls(options):
        for module in (control.net.module, control.source):
            modules.setdefault(id(module), module)
    return list(modules.values())


def build_guided_denoiser(model, cfg: float | None, options: dict[str, list[dict]],
                          tensor_names: list[str], bound: dict[str, list] | None = None) -> GuidedDenoiser:
    """The sample stage's module for conditioning beyond one full-area entry per side (the
    partition pass checked it is constant, without timestep ranges, on a non-inpainting UNet)."""
    return GuidedDenoiser(model, cfg, options, tensor_names, bound).eval()


def build_denoiser(model, cfg: float | None, *, node=None, positive: list[dict] | None = None,
                   negative: list[dict] | None = None, bound: dict[str, list] | None = None) -> Denoiser:
    """The denoiser module for ``model`` (a ``DiffusionModel``) at guidance ``cfg`` (None: a
    runtime value, so both sides always run).

    ``positive``/``negative`` are the conditioning entries' compile-time options (one dict per
    entry, as ``stages.flatten`` returns them); anything but one full-area entry per side, and
    UNets whose extra input channels are not inpainting's mask + image, are refused naming
    ``node`` (the sampler).
    """
    problems = []

    def refuse(message: str, input_name: str | None = None, **kw) -> None:
        problems.append(Problem("unsupported_in_plan", message, node_id=getattr(node, "id", None),
                                class_type=getattr(node, "class_type", None), title=getattr(node, "title", None),
                                input_name=input_name, **kw))

    channels = model.latent_format.channels
    if model.in_channels not in (channels, 2 * channels + 1):
        refuse("compiled plans take UNets with the latent's channels, or inpainting's extra mask and image",
               input_name="model", expected=f"{channels} or {2 * channels + 1} input channels",
               found=f"{model.in_channels}")
    for side, entries in (("positive", positive), ("negative", negative)):
        if entries is None:
            continue
        if len(entries) != 1:
            refuse("compiled plans take exactly one conditioning entry per side", input_name=side,
                   expected="1 entry (no ConditioningCombine)", found=f"{len(entries)} entries")
            continue
        used = sorted(k for k, neutral in _NEUTRAL_OPTIONS.items()
                      if entries[0].get(k, neutral) is not None and entries[0].get(k, neutral) != neutral)
        if used:
            refuse("compiled plans take full-area conditioning only", input_name=side,
                   expected="no area, mask, strength or timestep range", found=", ".join(used))
    if problems:
        raise KilnError(problems)
    return Denoiser(model, cfg, bound).eval()
