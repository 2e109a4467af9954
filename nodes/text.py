"""Text conditioning nodes: CLIPTextEncode and CLIPSetLastLayer (ComfyUI ``nodes.py``)."""
from __future__ import annotations

import torch
from torch import nn

from kiln.kernels.clip_bpe import BOS_TOKEN, EOS_TOKEN
from kiln.kernels.prompt_syntax import apply_weight
from kiln.nodes.plan import NodeModule
from kiln.nodes.registry import INT, SOCKET, STRING, PlanSpec, node
from kiln.nodes.values import ClipHandle


class ClipTextEncodeModule(NodeModule):
    """CLIPTextEncode on a runtime prompt, given as tokens per text encoder
    (kiln.runtime.prompts.tokenize_prompt): ComfyUI's ``encode_token_weights`` per encoder, and
    for SDXL CLIP-L and CLIP-G hidden states side by side with CLIP-G's pooled output. The empty
    prompt is always encoded and ``torch.where`` applies the weights, which equals encoding it
    only when some weight is not 1."""

    def __init__(self, node, clip):
        super().__init__(node)
        self.keys = list(clip.encoders)
        self.encoders = nn.ModuleList(clip.encoders.values())
        self.layers = [encoder.resolve_layer(clip.layer_idx) for encoder in self.encoders]
        self.sdxl = clip.arch == "sdxl"

    def forward(self, text: torch.Tensor) -> list:
        encoded = {key: self._encode(encoder, layer, tokens)
                   for key, encoder, layer, tokens in zip(self.keys, self.encoders, self.layers, text)}
        if self.sdxl:
            cond = torch.cat([encoded["l"][0], encoded["g"][0]], dim=-1)
            pooled = encoded["g"][1]
        else:
            ((cond, pooled),) = encoded.values()
        return [[cond, {"pooled_output": pooled}]]

    @staticmethod
    def _encode(enc, layer, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = enc.spec
        ids, weights = text[..., 0].long(), text[..., 1].float().unsqueeze(-1)
        count, length = ids.shape
        empty = torch.full((1, length), spec.pad_token, dtype=ids.dtype, device=ids.device)
        empty[0, 0], empty[0, 1] = BOS_TOKEN, EOS_TOKEN
        last, hidden, pooled, projected = enc(torch.cat([ids, empty]), layer)
        if layer is None:
            z = last
        else:
            z = enc.model.text_model.final_layer_norm(hidden) if spec.norm_hidden else hidden
        z = z.float()
        chunks, z_empty = z[:count], z[count:]
        chunks = torch.where(weights != 1.0, apply_weight(chunks, z_empty, weights), chunks)
        pooled = (projected if spec.projected_pooled else pooled)[0:1].float()
        return chunks.reshape(1, count * length, -1), pooled


@node("CLIPTextEncode", [STRING("text", multiline=True), SOCKET("clip", "CLIP")], ["CONDITIONING"],
      category="conditioning", foldable=True,
      plan=PlanSpec("module", runtime_widgets={"text": "text"}, computes=("0.cond", "0.pooled_output"),
                    lower=lambda node, w: ClipTextEncodeModule(node, w["clip"])),
      display_name="CLIP Text Encode (Prompt)")
def clip_text_encode(text: str, clip: ClipHandle) -> tuple:
    """Prompt -> ``[[cond, {"pooled_output": pooled}]]`` (ComfyUI's ``encode_from_tokens_scheduled``
    without hooks)."""
    if clip is None:
        raise ValueError("clip input is invalid: None (the checkpoint has no CLIP / text encoder)")
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return ([[cond, {"pooled_output": pooled}]],)


@node("CLIPSetLastLayer", [SOCKET("clip", "CLIP"), INT("stop_at_clip_layer", -1, min=-24, max=-1)], ["CLIP"],
      category="conditioning", foldable=True, display_name="CLIP Set Last Layer")
def clip_set_last_layer(clip: ClipHandle, stop_at_clip_layer: int) -> tuple:
    """A copy of ``clip`` that reads the hidden state of layer ``stop_at_clip_layer`` (-1 = last)."""
    return (clip.clip_layer(stop_at_clip_layer),)
