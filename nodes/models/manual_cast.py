"""Weights kept in their storage dtype, cast to the compute dtype each time a layer runs: ComfyUI's
``comfy.ops.manual_cast``, which is how it runs its fp16 text encoders on fp32 activations.

A cast fp16 -> fp32 is exact, so the numbers are those of fp32 weights rounded through fp16, while
the model holds half the bytes (SDXL's two text encoders: 1.6 GB instead of 3.3 GB; a VAE read from
an fp16 file keeps its fp16 weights). Export-safe: the casts are ordinary ops in the traced graph.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class CastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class CastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


class CastGroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


class CastLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class CastEmbedding(nn.Embedding):
    """Rows come out in ``compute_dtype`` (an embedding has no input dtype to follow)."""

    compute_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse).to(self.compute_dtype)


_CASTING = {nn.Linear: CastLinear, nn.Conv2d: CastConv2d, nn.GroupNorm: CastGroupNorm, nn.LayerNorm: CastLayerNorm,
            nn.Embedding: CastEmbedding}
_EXACT = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32)}


def held_dtype(stored: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """What to hold a weight read as ``stored`` in, for a model computing in ``compute``: as read
    when the cast to ``compute`` is exact (fp16 -> fp32), else ``compute`` itself."""
    return stored if (stored, compute) in _EXACT else compute


def cast_on_use(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """``model`` (in place) with its linear, convolution, norm and embedding layers casting their
    weights to the activations' dtype (embeddings: to ``compute_dtype``) as they run."""
    for module in model.modules():
        casting = _CASTING.get(type(module))
        if casting is not None:
            module.__class__ = casting
            if casting is CastEmbedding:
                module.compute_dtype = compute_dtype
    return model
