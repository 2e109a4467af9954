"""ControlNet nodes (``nodes.py``: ControlNetLoader, ControlNetApply, ControlNetApplyAdvanced):
the loader reads the file; the apply nodes attach a ``Control`` (the ControlNet with its hint,
strength and window, chained to the entry's previous one) to conditioning entries, and the
guider runs it at every model call."""
from __future__ import annotations

from kiln.kernels.errors import InputError
from kiln.nodes.loaders import load_once
from kiln.nodes.plan import NodeModule
from kiln.nodes.registry import COMBO, FLOAT, SOCKET, PlanSpec, RunContext, node


@node("ControlNetLoader", [COMBO("control_net_name", (), folder="controlnet")], ("CONTROL_NET",),
      category="loaders", needs_context=True, display_name="Load ControlNet Model")
def controlnet_loader(ctx: RunContext, control_net_name: str):
    from kiln.nodes.models.checkpoint import ModelFileError, load_state_dict
    from kiln.nodes.models.controlnet import load_controlnet

    path = ctx.models.resolve("controlnet", control_net_name)
    try:
        return (load_once(ctx, ("controlnet", str(path), ctx.device, ctx.dtype),
                        lambda: load_controlnet(load_state_dict(path), path, device=ctx.device,
                                                dtype=ctx.torch_dtype)),)
    except ModelFileError as error:
        raise InputError("control_net_name", f"{control_net_name}: {error.message}",
                         expected="an SD1.x, SD2.x or SDXL ControlNet", found=str(path)) from None


def _controlled(conditioning: list, control_net, image, strength: float, percent_range: tuple[float, float],
                to_uncond: bool, shared: dict) -> list:
    """Each entry with a copy of the ControlNet holding the hint, chained to the entry's previous
    one; entries with the same previous share one copy (so both CFG sides batch together)."""
    from kiln.nodes.models.controlnet import Control

    hint = as_hint(image)
    out = []
    for cond, options in conditioning:
        previous = options.get("control")
        key = id(previous)
        if key not in shared:
            shared[key] = Control(control_net, hint, strength, percent_range, previous)
        out.append([cond, {**options, "control": shared[key], "control_apply_to_uncond": to_uncond}])
    return out


def as_hint(image):
    """IMAGE [B,H,W,C] -> the hint a Control holds, [B,C,H,W]."""
    return image.movedim(-1, 1)


class HintModule(NodeModule):
    """A run-time hint image as the Controls of the node hold it (plans bind it, ``PlanSpec.bound``)."""

    def forward(self, image):
        return {"control_hint": as_hint(image)}


def _new_hints(inputs: dict, outputs: tuple) -> dict:
    """The hint buffers of the Controls this node made (not those of the entries it was given)."""
    def controls(conditioning_lists):
        return {id(o["control"]): o["control"] for cl in conditioning_lists for _, o in cl if o.get("control")}
    given = controls(v for k, v in inputs.items() if k in ("conditioning", "positive", "negative"))
    made = controls(outputs)
    return {"control_hint": [(c.source, "hint") for key, c in made.items() if key not in given]}


# ComfyUI evaluates these with their hint; in a plan the hint may be a run-time image.
_HINT_PLAN = PlanSpec("bind", sockets=("image",), computes=("control_hint",), lower=lambda node, w: HintModule(node),
                      bound=_new_hints)


@node("ControlNetApply", [SOCKET("conditioning", "CONDITIONING"), SOCKET("control_net", "CONTROL_NET"),
                          SOCKET("image", "IMAGE"), FLOAT("strength", 1.0, 0.0, 10.0, 0.01)],
      ("CONDITIONING",), category="conditioning/controlnet", display_name="Apply ControlNet (OLD)", plan=_HINT_PLAN)
def controlnet_apply(conditioning, control_net, image, strength: float):
    if strength == 0:
        return (conditioning,)
    # ComfyUI makes one copy per entry here (never shared): a fresh dict for every entry.
    out = []
    for entry in conditioning:
        out += _controlled([entry], control_net, image, strength, (0.0, 1.0), True, {})
    return (out,)


@node("ControlNetApplyAdvanced", [SOCKET("positive", "CONDITIONING"), SOCKET("negative", "CONDITIONING"),
                                  SOCKET("control_net", "CONTROL_NET"), SOCKET("image", "IMAGE"),
                                  FLOAT("strength", 1.0, 0.0, 10.0, 0.01),
                                  FLOAT("start_percent", 0.0, 0.0, 1.0, 0.001),
                                  FLOAT("end_percent", 1.0, 0.0, 1.0, 0.001), SOCKET("vae", "VAE", optional=True)],
      ("CONDITIONING", "CONDITIONING"), category="conditioning/controlnet", display_name="Apply ControlNet",
      plan=_HINT_PLAN)
def controlnet_apply_advanced(positive, negative, control_net, image, strength: float, start_percent: float,
                              end_percent: float, vae=None):
    """``vae`` is for ControlNets working on latents (SD3, Flux), which kiln does not load; SD
    ControlNets ignore it, as in ComfyUI."""
    if strength == 0:
        return positive, negative
    if image.ndim != 4:
        raise InputError("image", "the hint must be an IMAGE batch", expected="[B, H, W, C]",
                         found=str(list(image.shape)))
    shared: dict = {}
    return (_controlled(positive, control_net, image, strength, (start_percent, end_percent), False, shared),
            _controlled(negative, control_net, image, strength, (start_percent, end_percent), False, shared))
