"""``empty_latent`` (EmptyLatentImage with a runtime size): zeros at 1/8 of the pixel size."""
from __future__ import annotations

import torch

from kiln.runtime.kinds.base import StageKind


class EmptyLatent(StageKind):
    """Settings width, height, batch_size, channels; ``outputs`` {samples}: CPU zeros
    [batch, channels, height // 8, width // 8] (floored, as ComfyUI)."""

    name = "empty_latent"
    settings = ("width", "height", "batch_size", "channels")
    outputs = ("samples",)
    shown = ("width", "height", "batch_size")

    def _shape(self, stage, args, min_batch: int = 1) -> list[int]:
        width, height, batch, channels = (int(self.setting(stage, args, name)) for name in self.settings)
        return [max(min_batch, batch), channels, height // 8, width // 8]

    def run(self, stage, args, ctx):
        return {"samples": torch.zeros(self._shape(stage, args))}

    def example_outputs(self, stage, inputs, *, module, min_batch, device):
        return {"samples": torch.zeros(self._shape(stage, inputs, min_batch), device=device)}
