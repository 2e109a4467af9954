"""Text conditioning nodes: CLIPTextEncode and CLIPSetLastLayer (ComfyUI ``nodes.py``)."""
from __future__ import annotations

from kiln.nodes.registry import INT, SOCKET, STRING, node
from kiln.nodes.values import ClipHandle


@node("CLIPTextEncode", [STRING("text", multiline=True), SOCKET("clip", "CLIP")], ["CONDITIONING"],
      category="conditioning", foldable=True)
def clip_text_encode(text: str, clip: ClipHandle) -> tuple:
    """Prompt -> ``[[cond, {"pooled_output": pooled}]]`` (ComfyUI's ``encode_from_tokens_scheduled``
    without hooks)."""
    if clip is None:
        raise ValueError("clip input is invalid: None (the checkpoint has no CLIP / text encoder)")
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return ([[cond, {"pooled_output": pooled}]],)


@node("CLIPSetLastLayer", [SOCKET("clip", "CLIP"), INT("stop_at_clip_layer", -1, min=-24, max=-1)], ["CLIP"],
      category="conditioning", foldable=True)
def clip_set_last_layer(clip: ClipHandle, stop_at_clip_layer: int) -> tuple:
    """A copy of ``clip`` that reads the hidden state of layer ``stop_at_clip_layer`` (-1 = last)."""
    return (clip.clip_layer(stop_at_clip_layer),)
