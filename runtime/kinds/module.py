"""``module``: a fused chain of tensor nodes compiled as one artifact (VAE decode/encode, model
upscale, resizes, text encoders, the 8-bit conversion before saving). Positional tensor inputs
and outputs, in the order of ``inputs``/``outputs``."""
from __future__ import annotations

from typing import Any

import torch

from kiln.runtime.errors import PlanError
from kiln.runtime.kinds.base import StageKind


def as_tensor(value: Any, device: torch.device) -> torch.Tensor:
    """Runtime scalars reach compiled modules as 0-d tensors (int64 / float32 / bool)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, bool):
        return torch.tensor(value, device=device)
    dtype = torch.int64 if isinstance(value, int) else torch.float32
    return torch.tensor(value, dtype=dtype, device=device)


class Module(StageKind):
    name = "module"
    compiled = True
    outputs = None   # any names: the chain's output fields

    def check(self, stage):
        super().check(stage)
        if not stage.outputs:
            raise PlanError("invalid_plan", f"{stage.describe()} has no outputs")

    def run(self, stage, args, ctx):
        outputs = ctx.compiled[stage.name](*(as_tensor(args[name], ctx.device) for name in stage.inputs))
        if len(outputs) != len(stage.outputs):
            raise PlanError("invalid_plan", f"{stage.describe()}: the artifact returned {len(outputs)} values",
                            expected=f"{len(stage.outputs)} ({', '.join(stage.outputs)})", found=str(len(outputs)))
        return dict(zip(stage.outputs, outputs))

    def example_outputs(self, stage, inputs, *, module, min_batch, device):
        """Shapes and dtypes from a run on fake tensors (nothing computed; the ops' size checks run)."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        # A shape environment lets data-dependent ops (bislerp's masked writes) trace with unbacked sizes.
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()) as mode, torch.no_grad():
            outs = module(*[mode.from_tensor(inputs[name], static_shapes=True) for name in stage.inputs])
        return {name: torch.zeros(o.shape, dtype=o.dtype, device=device) for name, o in zip(stage.outputs, outs)}
