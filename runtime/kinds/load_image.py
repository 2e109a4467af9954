"""``load_image`` (a LoadImage whose file name is a runtime input): reads the file from the run's
input folder as the node does (``kiln.runtime.image_loading``)."""
from __future__ import annotations

import torch

from kiln.runtime.errors import PlanError
from kiln.runtime.files import find_in_folders
from kiln.runtime.image_loading import read_image
from kiln.runtime.kinds.base import StageKind

OUTPUTS = ("image", "mask")


class LoadImage(StageKind):
    """Setting ``image`` (a file name in the run's input folder); outputs ``image`` [F,H,W,3] and
    ``mask`` [F,H,W] (those the plan reads). Params ``shapes``: per output the shape the workflow's
    image gave at compile time, a dim the compiled stages after it take at any size as null."""

    name = "load_image"
    settings = ("image",)
    outputs = OUTPUTS
    shown = ("image",)

    def check(self, stage):
        super().check(stage)
        shapes = stage.params.get("shapes")
        if not isinstance(shapes, dict) or set(stage.outputs) - set(shapes):
            raise PlanError("invalid_plan", f"{stage.describe()} needs a shape per output",
                            expected=", ".join(stage.outputs), found=repr(shapes))

    def run(self, stage, args, ctx):
        name = str(self.setting(stage, args, "image"))
        node_id = stage.node_ids[0]
        where = {"node_id": node_id, "class_type": "LoadImage", "input_name": "image"}
        if ctx.input_dir is None:
            raise PlanError("missing_image", "this plan loads an image by name and was given no input folder",
                            **where, expected="kiln run x.plan --input-dir <folder with the image>",
                            found=repr(name))
        try:
            path = find_in_folders(name, [ctx.input_dir], "an input image")
        except ValueError:
            raise PlanError("invalid_input", "an image name is a file inside the input folder", **where,
                            expected="a relative name such as photo.png", found=repr(name)) from None
        except FileNotFoundError:
            raise PlanError("missing_image", "no such image file", **where,
                            expected=f"a file in {ctx.input_dir}", found=repr(name)) from None
        try:
            image, mask = read_image(path)
        except (OSError, ValueError) as error:
            raise PlanError("invalid_image", f"cannot read the image: {error}", **where,
                            expected="an image file Pillow reads (PNG, JPEG, WebP, ...)", found=repr(name)) from None
        out = {"image": image, "mask": mask}
        for local in stage.outputs:
            _check_shape(stage.params["shapes"][local], out[local], local, name, where)
        return {local: out[local] for local in stage.outputs}

    def example_outputs(self, stage, inputs, *, module, min_batch, device):
        return {local: torch.zeros([1 if d is None else d for d in shape], device=device)
                for local, shape in stage.params["shapes"].items()}


def _check_shape(takes: list, found: torch.Tensor, local: str, name: str, where: dict) -> None:
    """The compiled stages after a runtime image take the sizes they were exported for."""
    if all(d is None or d == f for d, f in zip(takes, found.shape)) and len(takes) == found.ndim:
        return
    what = "frames x height x width" + (" x channels" if local == "image" else "")
    raise PlanError("invalid_image", f"the plan was compiled for {local}s of this size ({what}); resize the "
                    "image, or compile the plan from an image of the size you will give it", **where,
                    expected=_shown(takes), found=f"{_shown(found.shape)} ({name})")


def _shown(shape) -> str:
    return "x".join("any" if d is None else str(d) for d in shape)
