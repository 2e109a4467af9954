"""Conditioning list nodes (nodes.py): combine, regional area, zero-out.

CONDITIONING is ComfyUI's ``list[(tensor, dict)]``; nodes copy the dicts and never mutate
their inputs (a folded constant may be shared by several consumers).
"""
from __future__ import annotations

import torch

from kiln.nodes.registry import FLOAT, INT, SOCKET, node

MAX_RESOLUTION = 16384


def _set_values(conditioning: list, values: dict) -> list:
    """``node_helpers.conditioning_set_values``: same tensors, dicts copied with ``values`` set."""
    return [(t, {**d, **values}) for t, d in conditioning]


@node("ConditioningCombine",
      [SOCKET("conditioning_1", "CONDITIONING"), SOCKET("conditioning_2", "CONDITIONING")],
      ["CONDITIONING"], category="conditioning", display_name="Conditioning (Combine)")
def conditioning_combine(*, conditioning_1: list, conditioning_2: list) -> tuple:
    """Both lists; the sampler averages their predictions (weighted by area/strength)."""
    return (conditioning_1 + conditioning_2,)


@node("ConditioningSetArea",
      [SOCKET("conditioning", "CONDITIONING"),
       INT("width", 64, 64, MAX_RESOLUTION, 8), INT("height", 64, 64, MAX_RESOLUTION, 8),
       INT("x", 0, 0, MAX_RESOLUTION, 8), INT("y", 0, 0, MAX_RESOLUTION, 8),
       FLOAT("strength", 1.0, 0.0, 10.0, 0.01)],
      ["CONDITIONING"], category="conditioning", display_name="Conditioning (Set Area)")
def conditioning_set_area(*, conditioning: list, width: int, height: int, x: int, y: int,
                          strength: float) -> tuple:
    """Restrict to a pixel rectangle, stored in latent px as ComfyUI's (h, w, y, x)."""
    area = (height // 8, width // 8, y // 8, x // 8)
    return (_set_values(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


@node("ConditioningZeroOut", [SOCKET("conditioning", "CONDITIONING")], ["CONDITIONING"],
      category="advanced/conditioning")
def conditioning_zero_out(*, conditioning: list) -> tuple:
    """Zero text tokens and pooled output (a common 'empty negative' for SDXL-style models)."""
    out = []
    for t, d in conditioning:
        d = dict(d)
        if d.get("pooled_output") is not None:
            d["pooled_output"] = torch.zeros_like(d["pooled_output"])
        out.append((torch.zeros_like(t), d))
    return (out,)
