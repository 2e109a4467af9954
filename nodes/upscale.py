"""Model-based upscaling nodes: UpscaleModelLoader and ImageUpscaleWithModel.

UPSCALE_MODEL values are spandrel ``ImageModelDescriptor``s (callable on NCHW [0,1] tensors,
with ``scale`` and ``device``), as in ComfyUI.
"""
from __future__ import annotations

import torch

from kiln.nodes.loaders import load_once
from kiln.nodes.models.upscale_model import OVERLAP, TILE, load_upscale_model, tiled_scale, upscale_image
from kiln.nodes.plan import NeedsStaticShapes, NodeModule, is_static, plan_problem
from kiln.nodes.registry import COMBO, SOCKET, PlanSpec, RunContext, node
from kiln.nodes.resize import common_upscale


class UpscaleWithModelModule(NodeModule):
    """ImageUpscaleWithModel in a plan: one model call when the image fits in one 512 px tile,
    else ComfyUI's overlapping feathered tiles (the interpreter's ``tiled_scale``, unrolled over
    the tile positions, so the image size must be concrete)."""

    def __init__(self, node, descriptor):
        super().__init__(node)
        self.model = descriptor.model
        self.scale = descriptor.scale
        self.call = (lambda x: self.model(x)) if descriptor.size_requirements.none else descriptor
        self.largest = 0   # the largest side seen at concrete sizes (lowering's walk over the size range)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        batch, height, width = image.shape[0], image.shape[1], image.shape[2]
        if is_static(height, width):
            self.largest = max(self.largest, height, width)
            fits = height <= TILE and width <= TILE
        else:
            # Symbolic sizes (a runtime size input): the shape walk ran the op at the range's ends,
            # so when the largest image it saw fits one tile, every size in the range does.
            fits = 0 < self.largest <= TILE
            if fits:
                torch._check(height <= TILE)
                torch._check(width <= TILE)
        if not fits and not is_static(batch, height, width):
            raise NeedsStaticShapes(plan_problem(
                self.node, f"images larger than {TILE}x{TILE} are upscaled in tiles, which needs concrete sizes",
                input_name="image", expected=f"at most {TILE}x{TILE} pixels, or a constant size",
                found="a size set at run time"))
        alpha = None
        if image.shape[-1] == 4:
            image, alpha = image[..., :3], image[..., 3:4]
        pixels = image.movedim(-1, -3).float()
        if fits:
            out = self.call(pixels)
        else:
            out = tiled_scale(pixels, self.call, tile=TILE, overlap=OVERLAP, upscale_amount=self.scale,
                              output_device=pixels.device)
        out = torch.clamp(out, min=0, max=1.0).movedim(-3, -1)
        if alpha is not None:
            alpha = common_upscale(alpha.movedim(-1, -3).to(out), out.shape[2], out.shape[1], "bilinear", "disabled")
            out = torch.cat((out, alpha.movedim(-3, -1)), dim=-1)
        return out


@node("UpscaleModelLoader",
      [COMBO("model_name", lambda ctx: ctx.models.list("upscale_models"), folder="upscale_models")],
      ["UPSCALE_MODEL"], category="loaders", needs_context=True,
      display_name="Load Upscale Model", python_module="comfy_extras.nodes_upscale_model")
def upscale_model_loader(ctx: RunContext, model_name: str):
    path = ctx.models.resolve("upscale_models", model_name)
    return (load_once(ctx, ("upscale_model", str(path), str(ctx.device)),
                      lambda: load_upscale_model(path, device=ctx.device)),)


@node("ImageUpscaleWithModel", [SOCKET("upscale_model", "UPSCALE_MODEL"), SOCKET("image", "IMAGE")],
      ["IMAGE"], category="image/upscaling", needs_context=True,
      plan=PlanSpec("module", computes=("value",),
                    lower=lambda node, w: UpscaleWithModelModule(node, w["upscale_model"])),
      display_name="Upscale Image (using Model)", python_module="comfy_extras.nodes_upscale_model")
def image_upscale_with_model(ctx: RunContext, upscale_model, image):
    return (upscale_image(upscale_model, image, scale=upscale_model.scale, device=upscale_model.device,
                          progress=ctx.progress),)
