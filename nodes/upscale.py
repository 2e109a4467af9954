"""Model-based upscaling nodes: UpscaleModelLoader and ImageUpscaleWithModel.

UPSCALE_MODEL values are spandrel ``ImageModelDescriptor``s (callable on NCHW [0,1] tensors,
with ``scale`` and ``device``), as in ComfyUI.
"""
from __future__ import annotations

from kiln.nodes.models.upscale_model import load_upscale_model, upscale_image
from kiln.nodes.registry import COMBO, SOCKET, RunContext, node


@node("UpscaleModelLoader",
      [COMBO("model_name", lambda ctx: ctx.models.list("upscale_models"), folder="upscale_models")],
      ["UPSCALE_MODEL"], category="loaders", needs_context=True)
def upscale_model_loader(ctx: RunContext, model_name: str):
    path = ctx.models.resolve("upscale_models", model_name)
    key = ("upscale_model", str(path), str(ctx.device))
    if key not in ctx.cache:
        ctx.cache[key] = load_upscale_model(path, device=ctx.device)
    return (ctx.cache[key],)


@node("ImageUpscaleWithModel", [SOCKET("upscale_model", "UPSCALE_MODEL"), SOCKET("image", "IMAGE")],
      ["IMAGE"], category="image/upscaling", needs_context=True)
def image_upscale_with_model(ctx: RunContext, upscale_model, image):
    return (upscale_image(upscale_model, image, scale=upscale_model.scale, device=upscale_model.device,
                          progress=ctx.progress),)
