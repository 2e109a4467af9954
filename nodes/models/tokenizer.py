"""The interpreter's CLIP tokenizer: kiln.kernels.clip_bpe on the merge file open-clip-torch ships.

ComfyUI loads OpenAI's CLIP vocabulary from ``comfy/sd1_tokenizer``; the same merges ship inside
open-clip-torch (``bpe_simple_vocab_16e6.txt.gz``), so no hub download is needed. Compiled plans
with a runtime prompt store this file's bytes for the runtime's tokenizer.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from kiln.kernels.clip_bpe import BOS_TOKEN, EOS_TOKEN, VOCAB_SIZE, ClipBpe

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "VOCAB_SIZE", "clip_merge_file", "encode_words"]


def _bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open-clip-torch is needed for the CLIP BPE merges but is not installed")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def clip_merge_file() -> bytes:
    """The gzipped CLIP merge file's bytes."""
    return _bpe_file().read_bytes()


@lru_cache(maxsize=1)
def _clip_bpe() -> ClipBpe:
    return ClipBpe(clip_merge_file())


def encode_words(text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS (what ComfyUI slices out of ``tokenizer(word)``)."""
    return _clip_bpe().encode_words(text)
