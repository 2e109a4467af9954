"""``tokenize``: a runtime prompt -> the packed weighted tokens the compiled CLIPTextEncode after it takes."""
from __future__ import annotations

import torch

from kiln.kernels.clip_bpe import BOS_TOKEN, EOS_TOKEN
from kiln.kernels.prompt_syntax import MAX_LENGTH
from kiln.runtime import env
from kiln.runtime.kinds.base import StageKind
from kiln.runtime.prompts import pack_tokens, tokenize_prompt


class Tokenize(StageKind):
    """``inputs`` {text}; ``params`` {pad_tokens (one per text encoder, in the CLIP's encoder order),
    max_chunks, vocabulary (the plan member with CLIP's BPE merges)}; ``outputs`` {tokens}:
    float64 [encoders, chunks, 77, 2] of (token id, weight)."""

    name = "tokenize"
    settings = ("text", "pad_tokens", "max_chunks", "vocabulary")
    outputs = ("tokens",)
    shown = ("pad_tokens", "max_chunks")

    def run(self, stage, args, ctx):
        input_name = env.input_name(stage.inputs.get("text", "")) or "text"
        tokens = tokenize_prompt(str(self.setting(stage, args, "text")), ctx.tokenizers[stage.params["vocabulary"]],
                                 [int(t) for t in stage.params["pad_tokens"]], int(stage.params["max_chunks"]),
                                 input_name)
        return {"tokens": tokens}

    def example_outputs(self, stage, inputs, *, module, min_batch, device):
        """The empty prompt in two chunks, so the chunk count can stay dynamic."""
        empty_chunk = [(BOS_TOKEN, 1.0)] + [(EOS_TOKEN, 1.0)] * (MAX_LENGTH - 1)
        chunks = pack_tokens([empty_chunk] * 2)
        return {"tokens": torch.stack([chunks] * len(stage.params["pad_tokens"]))}
