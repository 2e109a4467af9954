"""Image nodes: LoadImage, LoadImageMask, SaveImage, PreviewImage, ImageScale, ImageScaleBy.

Loading reproduces ``nodes.py`` pixel for pixel (``kiln.runtime.image_loading``, shared with plan
runs, whose ``load_image`` stages read a runtime file name); saving (ComfyUI's file
naming, ``uint8(clip(255*x))`` truncation, atomic writes) lives in ``kiln.runtime.images``,
shared with plan runs. The resizes' size rules are shared by the eager functions and the plan
modules (``kiln.nodes.resize.ResizeModule``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps

from kiln.kernels.images import to_uint8
from kiln.nodes.folders import IMAGE_EXTENSIONS, list_files
from kiln.nodes.plan import NodeModule, need_static
from kiln.nodes.registry import COMBO, FLOAT, INT, SOCKET, STRING, NodeDef, PlanSpec, RunContext, UiOutput, node
from kiln.nodes.resize import ResizeModule, resize, scale_by_size
from kiln.runtime.image_loading import pillow, read_image, to_float
from kiln.runtime.images import write_pngs, write_previews

MAX_RESOLUTION = 16384
IMAGE_SCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


def _input_images(ctx: RunContext) -> list[str]:
    return list_files(Path(ctx.input_dir), IMAGE_EXTENSIONS) if ctx.input_dir else []


def _input_path(ctx: RunContext, name: str) -> Path:
    if ctx.input_dir is None:
        raise ValueError("no input folder configured to load images from")
    return Path(ctx.input_dir) / name


@node("LoadImage", [COMBO("image", _input_images, folder="input")], ["IMAGE", "MASK"],
      category="image", needs_context=True, display_name="Load Image",
      plan=PlanSpec("load_image", runtime_widgets={"image": "image"}))
def load_image(ctx: RunContext, image: str):
    """IMAGE and MASK (``kiln.runtime.image_loading.read_image``, which plan runs share)."""
    return read_image(_input_path(ctx, image))


@node("LoadImageMask",
      [COMBO("image", _input_images, folder="input"), COMBO("channel", ["alpha", "red", "green", "blue"], "alpha")],
      ["MASK"], category="mask", needs_context=True, display_name="Load Image (as Mask)")
def load_image_mask(ctx: RunContext, image: str, channel: str):
    """One channel of the (first frame of the) file as a MASK [1,H,W]; alpha is inverted."""
    with pillow(Image.open, _input_path(ctx, image)) as img:
        frame = pillow(ImageOps.exif_transpose, img)
        if frame.getbands() != ("R", "G", "B", "A"):
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            frame = frame.convert("RGBA")
        band = channel[0].upper()
        if band not in frame.getbands():
            return (torch.zeros((1, 64, 64), dtype=torch.float32),)
        mask = to_float(frame.getchannel(band))
    return ((1. - mask if band == "A" else mask)[None],)


@node("SaveImage", [SOCKET("images", "IMAGE"), STRING("filename_prefix", "ComfyUI")], [],
      category="image", output_node=True, foldable=False, needs_context=True, plan=PlanSpec("save_image"),
      display_name="Save Image")
def save_image(ctx: RunContext, images: torch.Tensor, filename_prefix: str = "ComfyUI") -> UiOutput:
    """Writes ``<prefix>_<counter:05>_.png`` per image."""
    if ctx.output_dir is None:
        raise ValueError("no output folder configured to save images to")
    return UiOutput(tuple(write_pngs(images, filename_prefix, ctx.output_dir, ctx.prompt, ctx.extra_pnginfo,
                                     compress_level=4)))


@node("PreviewImage", [SOCKET("images", "IMAGE")], [], category="image", output_node=True,
      foldable=False, needs_context=True, plan=PlanSpec("save_image", params={"preview": True}),
      display_name="Preview Image")
def preview_image(ctx: RunContext, images: torch.Tensor) -> UiOutput:
    """Like ComfyUI's temp previews (``ComfyUI_temp_<5 letters>_NNNNN_.png``, compress level 1),
    written under ``<output_dir>/.preview/``."""
    if ctx.output_dir is None:
        raise ValueError("no output folder configured to write previews to")
    return UiOutput(tuple(write_previews(images, ctx.output_dir, ctx.prompt, ctx.extra_pnginfo)))


class ToUint8Module(NodeModule):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return to_uint8(images)


# Not a ComfyUI node (never in the catalogue): the 8-bit conversion before a plan's save_image
# stage, as a module member so it fuses into the final decode (its node id is the saver's).
IMAGE_TO_UINT8 = NodeDef(class_type="kiln.ImageToUint8", inputs=(SOCKET("images", "IMAGE"),),
                         outputs=("IMAGE_UINT8",), function=lambda images: (to_uint8(images),),
                         plan=PlanSpec("module", computes=("value",), lower=lambda node, w: ToUint8Module(node)))


def image_scale_size(node, width: int, height: int):
    """ImageScale's rule: width x height; a 0 side follows the aspect ratio, both 0 is a no-op."""
    def size(in_height, in_width):
        if width == 0 and height == 0:
            return None
        if width == 0 or height == 0:
            need_static(node, "keeping the aspect ratio (a size of 0) needs concrete sizes", in_height, in_width)
        w = width or max(1, round(in_width * height / in_height))
        h = height or max(1, round(in_height * w / in_width))
        return w, h
    return size


@node("ImageScale",
      [SOCKET("image", "IMAGE"), COMBO("upscale_method", IMAGE_SCALE_METHODS, "nearest-exact"),
       INT("width", 512, min=0, max=MAX_RESOLUTION), INT("height", 512, min=0, max=MAX_RESOLUTION),
       COMBO("crop", ["disabled", "center"], "disabled")],
      ["IMAGE"], category="image/upscaling",
      plan=PlanSpec("module", computes=("value",), lower=lambda node, w: ResizeModule(
          node, w["upscale_method"], image_scale_size(node, w["width"], w["height"]), w["crop"], latent=False)),
      display_name="Upscale Image")
def image_scale(image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str):
    """Resize to width x height; a 0 side follows the aspect ratio, both 0 is a no-op."""
    return (resize(image, upscale_method, image_scale_size(None, width, height), crop, latent=False),)


@node("ImageScaleBy",
      [SOCKET("image", "IMAGE"), COMBO("upscale_method", IMAGE_SCALE_METHODS, "nearest-exact"),
       FLOAT("scale_by", 1.0, min=0.01, max=8.0, step=0.01)],
      ["IMAGE"], category="image/upscaling",
      plan=PlanSpec("module", computes=("value",), lower=lambda node, w: ResizeModule(
          node, w["upscale_method"], scale_by_size(node, w["scale_by"]), "disabled", latent=False)),
      display_name="Upscale Image By")
def image_scale_by(image: torch.Tensor, upscale_method: str, scale_by: float):
    return (resize(image, upscale_method, scale_by_size(None, scale_by), "disabled", latent=False),)
