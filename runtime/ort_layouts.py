"""Weights in the layouts onnxruntime's CPU optimizer gives them, and back.

A CPU ONNX stage is stored already optimized (kiln.compiler.lower.ort_optimize): onnxruntime
folds a transpose into a linear layer's weight, reshapes norm scales for broadcasting, pads a
bias, re-lays convolution filters into MLAS's NCHWc blocks and folds the cast of a weight kept in
fp16 (a text encoder's) to the fp32 it computes in. The plan stores those re-laid
tensors only, so a LoRA, which patches a weight in its original layout, takes the weight back
(``Relayout.original``) and lays the patched weight out again (``Relayout.apply``). Every layout
is a permutation with zero padding, after an exact widening cast: the patched values are the ones
the optimizer would have produced from the patched weight, bit for bit (the compiler checks ``apply`` against what
onnxruntime produced for every tensor it records).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import torch

# How a stored initializer was made from an original weight.
LAYOUTS = ("reshape", "transpose", "pad", "nchwc", "nchwc_unblocked_input")


@dataclass(frozen=True)
class Relayout:
    """``stored = apply(weights[source])``; ``shape``: the original's, ``stored``: the initializer's."""

    source: str                 # the original weight's FQN (what lora.json and the AOTI path name)
    layout: str                 # LAYOUTS
    shape: tuple[int, ...]
    stored: tuple[int, ...]
    block: int = 0              # NCHWc block size (channels per block), for the nchwc layouts
    cast: tuple[str, str] = ()  # (the original's dtype, the stored one) when the graph widened it

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}")
        if self.cast and not all(isinstance(getattr(torch, name, None), torch.dtype) for name in self.cast):
            raise ValueError(f"unknown dtypes {self.cast!r}")

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored tensor made from ``weight`` (the original layout)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"{self.source}: expected shape {list(self.shape)}, found {list(weight.shape)}")
        if self.cast:
            weight = weight.to(getattr(torch, self.cast[1]))
        if self.layout == "reshape":
            out = weight.reshape(-1)
        elif self.layout == "transpose":
            out = weight.t().reshape(-1)
        elif self.layout == "pad":
            out = _zero_padded(weight.reshape(-1), 0, math.prod(self.stored))
        else:
            out = _filter_blocks(weight, self.block, self.layout == "nchwc").reshape(-1)
        return out.contiguous().reshape(self.stored)

    def original(self, stored: torch.Tensor) -> torch.Tensor:
        """The original-layout weight ``stored`` was made from (``apply``'s inverse)."""
        flat = stored.reshape(-1)
        if self.layout == "reshape":
            weight = flat.reshape(self.shape).clone()
        elif self.layout == "transpose":
            weight = flat.reshape(self.shape[::-1]).t().contiguous()
        elif self.layout == "pad":
            weight = flat[:math.prod(self.shape)].reshape(self.shape).clone()
        else:
            weight = _filter_unblocked(flat, self.shape, self.block, self.layout == "nchwc")
        return weight.to(getattr(torch, self.cast[0])) if self.cast else weight

    def to_json(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items() if value or key not in ("block", "cast")}

    @classmethod
    def from_json(cls, data: Mapping) -> "Relayout":
        return cls(source=str(data["source"]), layout=str(data["layout"]), shape=tuple(int(d) for d in data["shape"]),
                   stored=tuple(int(d) for d in data["stored"]), block=int(data.get("block", 0)),
                   cast=tuple(str(d) for d in data.get("cast", ())))


def _zero_padded(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] == size:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = size
    out = tensor.new_zeros(shape)
    out.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return out


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _filter_blocks(weight: torch.Tensor, block: int, blocked_input: bool) -> torch.Tensor:
    """MLAS's filter reorders: OIHW -> OIHWBiBo (``blocked_input``: output and input channels in
    blocks, [O/b, I/b, H, W, b_in, b_out]) or OIHWBo (only output channels, [O/b, I, H, W, b_out]),
    channels zero-padded to whole blocks."""
    out_channels, in_channels, height, width = weight.shape
    padded = _zero_padded(weight, 0, _round_up(out_channels, block))
    if blocked_input:
        padded = _zero_padded(padded, 1, _round_up(in_channels, block))
        o_blocks, i_blocks = padded.shape[0] // block, padded.shape[1] // block
        return padded.reshape(o_blocks, block, i_blocks, block, height, width).permute(0, 2, 4, 5, 3, 1)
    return padded.reshape(padded.shape[0] // block, block, in_channels, height, width).permute(0, 2, 3, 4, 1)


def _filter_unblocked(flat: torch.Tensor, shape: tuple[int, ...], block: int, blocked_input: bool) -> torch.Tensor:
    out_channels, in_channels, height, width = shape
    o_padded = _round_up(out_channels, block)
    if blocked_input:
        i_padded = _round_up(in_channels, block)
        blocks = flat.reshape(o_padded // block, i_padded // block, height, width, block, block)
        full = blocks.permute(0, 5, 1, 4, 2, 3).reshape(o_padded, i_padded, height, width)
    else:
        blocks = flat.reshape(o_padded // block, in_channels, height, width, block)
        full = blocks.permute(0, 4, 1, 2, 3).reshape(o_padded, in_channels, height, width)
    return full[:out_channels, :in_channels].contiguous()


def relayouts(data: Mapping | None) -> dict[str, Relayout]:
    """A stage's ``relayouts`` manifest entry (initializer name -> layout record) as objects."""
    return {name: Relayout.from_json(entry) for name, entry in (data or {}).items()}


def originals(stored: Mapping[str, torch.Tensor], layouts: Mapping[str, Relayout]) -> dict[str, str]:
    """Original FQN -> the stored initializer that holds it (as itself or re-laid); the first one
    when several are made from one weight."""
    out = {name: name for name in stored if name not in layouts}
    for name, layout in layouts.items():
        out.setdefault(layout.source, name)
    return out


def relaid(patched: Mapping[str, torch.Tensor], stored_names, layouts: Mapping[str, Relayout]
           ) -> dict[str, torch.Tensor]:
    """Initializer name -> tensor for every stored initializer the patched originals change."""
    out = {name: tensor for name, tensor in patched.items() if name in stored_names and name not in layouts}
    out.update({name: layout.apply(patched[layout.source]) for name, layout in layouts.items()
                if layout.source in patched})
    return out
