"""``save_image`` (SaveImage, PreviewImage): PNGs named and tagged as ComfyUI writes them."""
from __future__ import annotations

from kiln.runtime.errors import PlanError
from kiln.runtime.images import write_pngs, write_previews
from kiln.runtime.kinds.base import StageKind


class SaveImage(StageKind):
    """``inputs`` {images (uint8 NHWC; float [0,1] also accepted)}; ``params`` {filename_prefix,
    node_id}, or {preview: true, node_id} for PreviewImage (ComfyUI's ``ComfyUI_temp_<5 letters>``
    names, compress level 1, under ``<output>/.preview/``). The workflow, with the run's input
    values, goes into the ``prompt`` chunk."""

    name = "save_image"
    required = ("images",)
    settings = ("node_id",)
    outputs = ()
    shown = ("filename_prefix", "preview")

    def check(self, stage):
        super().check(stage)
        if not stage.params.get("preview") and "filename_prefix" not in stage.params:
            raise PlanError("invalid_plan", f"{stage.describe()} lacks filename_prefix")

    def run(self, stage, args, ctx):
        if stage.params.get("preview"):
            images = write_previews(args["images"], ctx.output_dir, ctx.prompt, ctx.extra_pnginfo)
        else:
            images = write_pngs(args["images"], str(self.setting(stage, args, "filename_prefix")), ctx.output_dir,
                                ctx.prompt, ctx.extra_pnginfo, compress_level=4)
        ctx.images.setdefault(str(stage.params["node_id"]), []).extend(images)
        return {}
