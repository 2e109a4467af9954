"""Runtime prompts: a STRING input tokenized exactly as the interpreter does (kiln.kernels),
packed into what compiled text stages take, and the sampler's two prompts brought to one length.

The vocabulary travels inside the plan (``VOCABULARY_MEMBER``), so a deployed plan needs
neither open-clip-torch nor transformers to take new prompts.
"""
from __future__ import annotations

import math

import torch

from kiln.kernels.clip_bpe import ClipBpe
from kiln.kernels.prompt_syntax import EMBEDDING_PREFIX, MAX_LENGTH, tokenize_with_weights
from kiln.runtime.errors import PlanError

VOCABULARY_MEMBER = "tokenizers/clip_bpe_simple_vocab_16e6.txt.gz"


def pack_tokens(chunks: list[list[tuple[int, float]]]) -> torch.Tensor:
    """A tokenized prompt (77-token chunks of (id, weight)) as the float64 [chunks, 77, 2] tensor
    a compiled text stage takes: ids are exact in float64, weights keep their double value."""
    return torch.tensor([[[float(t), float(w)] for t, w in chunk] for chunk in chunks], dtype=torch.float64)


def tokenize_prompt(text: str, bpe: ClipBpe, pad_tokens: list[int], max_chunks: int, input_name: str
                    ) -> torch.Tensor:
    """ComfyUI's weighted, chunked tokens of ``text`` for each text encoder (they differ only in
    the pad token), packed and stacked: float64 [encoders, chunks, 77, 2]. PlanError naming the
    input when the prompt uses an embedding or needs more chunks than the plan was compiled for."""
    def no_embeddings(name: str):
        raise PlanError("invalid_input", "a runtime prompt cannot use textual-inversion embeddings (plans do not "
                        "carry the embeddings folders)", input_name=input_name,
                        expected="a prompt without 'embedding:'", found=f"{EMBEDDING_PREFIX}{name.split()[0]}")

    per_encoder = [tokenize_with_weights(text, bpe.encode_words, pad, no_embeddings) for pad in pad_tokens]
    count = len(per_encoder[0])
    if count > max_chunks:
        raise PlanError("invalid_input", "the prompt is longer than the plan's text stage takes", input_name=input_name,
                        expected=f"at most {max_chunks} chunks of {MAX_LENGTH - 2} tokens", found=f"{count} chunks")
    return torch.stack([pack_tokens(chunks) for chunks in per_encoder])


def common_length(contexts: list[torch.Tensor], max_tokens: int, where: str) -> list[torch.Tensor]:
    """Both prompts' embeddings repeated to the least common multiple of their token counts, as
    ComfyUI's ``CONDCrossAttn.concat`` batches them (it runs the two separately when that needs
    more than 4x repetition: attention over repeated keys is the same mathematically, ~1e-6 apart)."""
    length = math.lcm(*(c.shape[1] for c in contexts))
    if length > max_tokens:
        raise PlanError("invalid_input", f"{where}: the positive and negative prompts' token counts "
                        f"({' and '.join(str(c.shape[1]) for c in contexts)}) have a common multiple longer than "
                        "the compiled denoiser takes", expected=f"at most {max_tokens} tokens", found=f"{length}",
                        hint="(make the prompts' chunk counts divide one another)")
    return [c if c.shape[1] == length else c.repeat(1, length // c.shape[1], 1) for c in contexts]
