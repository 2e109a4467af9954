"""CLIP text encoders of SD1 / SD2 / SDXL checkpoints with ComfyUI's numerics.

ComfyUI (``comfy/sd1_clip.py``, ``comfy/clip_model.py``, ``comfy/sd2_clip.py``, ``comfy/sdxl_clip.py``)
stores text-encoder weights in fp16 and computes in fp32 (``manual_cast``), uses a causal mask and
no padding mask, and reads either the final layer-normed output or an intermediate layer. The
encoders here are transformers' CLIP modules driven layer by layer, so that the intermediate
layer, the additive ``-inf`` causal mask and the eager attention follow ComfyUI's op order.

Per encoder (ComfyUI key in the token dict):

| arch | key | layout   | pad | default layer             | pooled                     |
|------|-----|----------|-----|---------------------------|----------------------------|
| sd1  | l   | CLIP-L   | EOS | last (final layer norm)   | EOS token, unprojected     |
| sd2  | h   | OpenCLIP | 0   | -2, with final layer norm | EOS token @ text_projection|
| sdxl | l   | CLIP-L   | EOS | -2, no final layer norm   | (unused)                   |
| sdxl | g   | OpenCLIP | 0   | -2, no final layer norm   | EOS token @ text_projection|
"""
from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from kiln.kernels.prompt_syntax import apply_weight
from kiln.kernels.lora import Adapter
from kiln.nodes.models.lora_keys import clip_lora_keys
from kiln.nodes.models.manual_cast import cast_on_use
from kiln.nodes.models.patching import PatchedWeights
from kiln.nodes.models.prompt_weights import Chunk, ChunkSpec, tokenize_with_weights
from kiln.nodes.models.tokenizer import BOS_TOKEN, EOS_TOKEN

log = logging.getLogger(__name__)


def heads_for_width(width: int) -> int:
    """Attention heads, which tensor shapes cannot tell: real CLIP text towers use 64-wide heads
    (CLIP-L 12, OpenCLIP H 16, bigG 20); tiny test models (width < 256) use 16-wide heads."""
    head_dim = 64 if width >= 256 else 16
    if width % head_dim:
        raise ValueError(f"CLIP width {width} is not a multiple of the head width {head_dim}")
    return width // head_dim


@dataclass(frozen=True)
class EncoderSpec:
    """Where one text encoder lives in a checkpoint and how ComfyUI runs it."""

    key: str                    # "l" | "h" | "g": the token-dict key
    prefix: str                 # checkpoint key prefix
    layout: str                 # "hf" (CLIP-L keys) | "openclip" (resblocks, fused in_proj)
    pad_token: int
    embedding_key: str
    layer_idx: int | None       # default layer: None = last (normed), else hidden layer index
    norm_hidden: bool           # final layer norm on an intermediate layer
    projected_pooled: bool      # pooled output through text_projection


_ARCH_SPECS: dict[str, tuple[EncoderSpec, ...]] = {
    "sd1": (EncoderSpec("l", "cond_stage_model.transformer.", "hf", EOS_TOKEN, "clip_l", None, True, False),),
    "sd2": (EncoderSpec("h", "cond_stage_model.model.", "openclip", 0, "clip_h", -2, True, True),),
    "sdxl": (EncoderSpec("g", "conditioner.embedders.1.model.", "openclip", 0, "clip_g", -2, False, True),
             EncoderSpec("l", "conditioner.embedders.0.transformer.", "hf", EOS_TOKEN, "clip_l", -2, False, True)),
}

_OPENCLIP_RENAMES = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def _hf_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-L keys (with or without the ``text_model.`` level old checkpoints lack) -> our module's keys."""
    out = {}
    for k, v in sd.items():
        name = k[len("text_model."):] if k.startswith("text_model.") else k
        if name.endswith("position_ids") or name == "logit_scale":
            continue
        out[name if name == "text_projection.weight" else "text_model." + name] = v
    return out


def _openclip_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower -> transformers CLIP keys: fused in_proj split into q/k/v, renamed blocks,
    and ``text_projection`` (applied as ``x @ P``) transposed into a Linear weight."""
    out = {}
    for k, v in sd.items():
        if k == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["text_model.final_layer_norm." + k[len("ln_final."):]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        else:   # logit_scale and anything else (e.g. a visual tower) is not part of the text encoder
            openclip_block(k, v, "text_model.encoder.layers.", out)
    return out


def openclip_block(name: str, v: torch.Tensor, layers: str, out: dict[str, torch.Tensor]) -> bool:
    """An OpenCLIP ``transformer.resblocks.N.*`` tensor into ``out`` under transformers'
    ``<layers>N.*`` names (``in_proj`` split into q/k/v); False for any other name."""
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name)
    if m is None:
        return False
    layer, rest = f"{layers}{m[1]}.", m[2]
    if rest.startswith("attn.in_proj_"):
        suffix = rest[len("attn.in_proj_"):]
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
            out[f"{layer}self_attn.{part}.{suffix}"] = chunk
        return True
    for old, new in _OPENCLIP_RENAMES.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old):]
            break
    out[layer + rest] = v
    return True


def _count_layers(sd: dict[str, torch.Tensor]) -> int:
    found = {int(m[1]) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    if not found or found != set(range(len(found))):
        raise ValueError(f"CLIP text encoder layers are missing or not numbered 0..n-1: {sorted(found)}")
    return len(found)


class ClipTextEncoder(nn.Module):
    """One CLIP text transformer run as ComfyUI's ``SDClipModel`` (``comfy/sd1_clip.py``)."""

    def __init__(self, model: CLIPTextModelWithProjection, spec: EncoderSpec,
                 storage_dtype: torch.dtype | None = torch.float16):
        super().__init__()
        self.model = model
        self.spec = spec
        self.storage_dtype = storage_dtype
        self.num_layers = model.config.num_hidden_layers
        self.width = model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, layer_idx: int | None = None,
                extra_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                   torch.Tensor, torch.Tensor]:
        """(final layer-normed hidden states, output of layer ``layer_idx`` or None,
        pooled = normed state at the first EOS, pooled @ text_projection).

        ids >= the vocabulary size pick rows of ``extra_embeds`` (textual-inversion vectors).
        """
        tm = self.model.text_model
        table = tm.embeddings.token_embedding
        if extra_embeds is None:
            x = table(input_ids)
        else:
            vocab = table.weight.shape[0]
            known = table(input_ids.clamp(max=vocab - 1))
            extra = nn.functional.embedding((input_ids - vocab).clamp(min=0), extra_embeds.to(known.dtype))
            x = torch.where((input_ids >= vocab).unsqueeze(-1), extra, known)
        seq = input_ids.shape[1]
        positions = tm.embeddings.position_embedding.weight   # whole when seq fills it: no slice for a plan's
        x = x + (positions if seq == positions.shape[0] else positions[:seq]).to(x.dtype)   # graph to fold
        mask = torch.full((seq, seq), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        stop = layer_idx + self.num_layers if layer_idx is not None and layer_idx < 0 else layer_idx
        intermediate = None
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x, mask)
            if i == stop:
                intermediate = x
        x = tm.final_layer_norm(x)
        eos = (input_ids == EOS_TOKEN).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]
        return x, intermediate, pooled, self.model.text_projection(pooled)

    def resolve_layer(self, override: int | None) -> int | None:
        """ComfyUI's ``set_clip_options``: no override keeps the default; ``|idx| > layers`` means last."""
        if override is None:
            return self.spec.layer_idx
        return None if abs(override) > self.num_layers else override

    def encode(self, chunks: Sequence[Sequence], layer_override: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [N,T,C] and pooled [N,P] (fp32) for N token chunks, encoded as one batch."""
        layer = self.resolve_layer(layer_override)
        ids, extra = self._ids(chunks)
        with torch.no_grad():
            last, hidden, pooled, projected = self(ids, layer, extra)
            if layer is None:
                z = last
            else:
                z = self.model.text_model.final_layer_norm(hidden) if self.spec.norm_hidden else hidden
        pooled = projected if self.spec.projected_pooled else pooled
        return z.float().cpu(), pooled.float().cpu()

    def encode_token_weights(self, chunks: Sequence[Chunk], layer_override: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """ComfyUI's ``ClipTokenWeightEncoder.encode_token_weights``: cond [1, 77*n, C], pooled [1, P].

        With any weight != 1 an empty prompt is encoded in the same batch and each weighted token
        becomes ``(z - z_empty) * w + z_empty``; the pooled output is the first chunk's.
        """
        has_weights = any(w != 1.0 for chunk in chunks for _, w in chunk)
        to_encode = [[t for t, _ in chunk] for chunk in chunks]
        if has_weights or not chunks:
            length = max((len(c) for c in chunks), default=0)
            to_encode.append([BOS_TOKEN, EOS_TOKEN] + [self.spec.pad_token] * (length - 2))
        z, pooled = self.encode(to_encode, layer_override)
        if not chunks:
            return z[-1:], pooled[0:1]
        out = []
        for k, chunk in enumerate(chunks):
            zk = z[k]
            if has_weights:
                w = torch.tensor([w for _, w in chunk], dtype=zk.dtype).unsqueeze(-1)
                zk = torch.where(w != 1.0, apply_weight(zk, z[-1], w), zk)
            out.append(zk)
        return torch.cat(out, dim=0).unsqueeze(0), pooled[0:1]

    def _ids(self, chunks: Sequence[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids; embedding vectors get ids past the vocabulary as in ComfyUI's
        ``set_up_textual_embeddings`` (wrong-width vectors are dropped, the row is padded)."""
        device = self.model.text_projection.weight.device
        vocab = self.model.text_model.embeddings.token_embedding.weight.shape[0]
        rows, extra = [], []
        for chunk in chunks:
            row = []
            for tok in chunk:
                if not isinstance(tok, torch.Tensor):
                    row.append(int(tok))
                elif tok.shape[-1] == self.width:
                    row.append(vocab + len(extra))
                    extra.append(tok.detach().to("cpu", torch.float32))
                else:
                    log.warning("embedding of size %d ignored by the %d-wide CLIP-%s", tok.shape[-1],
                                self.width, self.spec.key)
            rows.append(row + [self.spec.pad_token] * (len(chunk) - len(row)))
        ids = torch.tensor(rows, dtype=torch.long, device=device)
        if not extra:
            return ids, None
        vectors = torch.stack(extra)
        if self.storage_dtype is not None:  # ComfyUI writes them into its fp16 embedding table
            vectors = vectors.to(self.storage_dtype)
        return ids, vectors.to(device, self.model.dtype)


class Clip:
    """The CLIP socket value: tokenizer(s) + text encoder(s) + the CLIPSetLastLayer choice."""

    def __init__(self, arch: str, encoders: dict[str, ClipTextEncoder], embedding_dirs: Sequence[str] = (),
                 layer_idx: int | None = None):
        self.arch = arch
        # LoRA patches per encoder, keyed by ComfyUI's names (clip_l.transformer.text_model...).
        self.weights = {key: PatchedWeights(enc, {f"clip_{key}.transformer.{name}": f"model.{name}"
                                                  for name, _ in enc.model.named_parameters()}, enc.storage_dtype)
                        for key, enc in encoders.items()}
        self.embedding_dirs = tuple(embedding_dirs)
        self.layer_idx = layer_idx

    @property
    def encoders(self) -> dict[str, ClipTextEncoder]:
        """The text encoders with this handle's weight patches applied (computed on first use)."""
        return {key: weights.module() for key, weights in self.weights.items()}

    def with_weight_patches(self, patches: dict[str, Adapter], strength: float) -> tuple["Clip", set[str]]:
        """A copy of this CLIP with ``patches`` added at ``strength``, and the keys it took."""
        view, taken = copy.copy(self), set()
        view.weights = {}
        for key, weights in self.weights.items():
            view.weights[key], took = weights.add(patches, strength)
            taken |= took
        return view, taken

    def lora_keys(self) -> dict[str, str]:
        """LoRA tensor base name -> ComfyUI key of the text-encoder weight it patches."""
        return clip_lora_keys(key for weights in self.weights.values() for key in weights.targets)

    def tokenize(self, text: str) -> dict[str, list[Chunk]]:
        """Per encoder key ("l", "h", "g"): 77-token chunks of (token, weight)."""
        out = {}
        for key, enc in self.encoders.items():
            spec = ChunkSpec(pad_token=enc.spec.pad_token, embedding_size=enc.width,
                             embedding_key=enc.spec.embedding_key)
            out[key] = tokenize_with_weights(text, spec, self.embedding_dirs)
        return out

    def encode_from_tokens(self, tokens: dict[str, list[Chunk]], return_pooled: bool = False):
        """cond [1, 77*n, C] (SDXL: CLIP-L and CLIP-G concatenated on channels), and pooled [1, P]."""
        if self.arch == "sdxl":
            g, pooled = self.encoders["g"].encode_token_weights(tokens["g"], self.layer_idx)
            l, _ = self.encoders["l"].encode_token_weights(tokens["l"], self.layer_idx)
            n = min(l.shape[1], g.shape[1])
            cond = torch.cat([l[:, :n], g[:, :n]], dim=-1)
        else:
            (key, enc), = self.encoders.items()
            cond, pooled = enc.encode_token_weights(tokens[key], self.layer_idx)
        return (cond, pooled) if return_pooled else cond

    def encode(self, text: str, return_pooled: bool = False):
        return self.encode_from_tokens(self.tokenize(text), return_pooled)

    def clip_layer(self, layer_idx: int) -> "Clip":
        """A copy (sharing the encoders) that stops at ``layer_idx`` (CLIPSetLastLayer)."""
        view = copy.copy(self)
        view.layer_idx = layer_idx
        return view


def _text_config(sd: dict[str, torch.Tensor], layout: str) -> CLIPTextConfig:
    vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width,
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection_dim=sd["text_projection.weight"].shape[0] if "text_projection.weight" in sd else width,
        num_hidden_layers=_count_layers(sd), num_attention_heads=heads_for_width(width),
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu" if layout == "hf" else "gelu", layer_norm_eps=1e-5,
        bos_token_id=BOS_TOKEN, eos_token_id=EOS_TOKEN, pad_token_id=1,
    )
    config._attn_implementation = "eager"  # matmul * scale + mask, softmax, matmul: ComfyUI's attention_basic
    return config


def build_text_encoder(sd: dict[str, torch.Tensor], spec: EncoderSpec, *, device="cpu",
                       dtype: torch.dtype = torch.float32,
                       storage_dtype: torch.dtype | None = torch.float16) -> ClipTextEncoder:
    """One encoder from its checkpoint tensors (prefix already removed), which it takes out of
    ``sd`` as it converts them.

    Weights are held in ``storage_dtype`` and cast to ``dtype`` as each layer runs (ComfyUI keeps
    text encoders in fp16 and casts them to the fp32 activations: kiln.nodes.models.manual_cast);
    ``storage_dtype`` None holds them in ``dtype``. A missing text_projection (SD1) is the identity,
    as in ComfyUI.
    """
    source = sd
    sd = _hf_keys(source) if spec.layout == "hf" else _openclip_keys(source)
    source.clear()   # the renamed dict holds the tensors now: each is freed once converted
    config = _text_config(sd, spec.layout)
    if "text_projection.weight" not in sd:
        sd["text_projection.weight"] = torch.eye(config.hidden_size)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    held = storage_dtype or dtype
    weights = {k: sd.pop(k).to(device=device, dtype=held) for k in list(sd)}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"CLIP-{spec.key} weights do not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    positions = torch.arange(config.max_position_embeddings, device=device).unsqueeze(0)
    model.text_model.embeddings.register_buffer("position_ids", positions, persistent=False)
    cast_on_use(model, dtype)
    return ClipTextEncoder(model.eval().requires_grad_(False), spec, storage_dtype)


def build_clip(state_dict: dict[str, torch.Tensor], arch: str, *, device="cpu",
               dtype: torch.dtype = torch.float32, storage_dtype: torch.dtype | None = torch.float16,
               embedding_dirs: Sequence[str] = ()) -> Clip:
    """The CLIP of a full single-file checkpoint of ``arch`` ("sd1" | "sd2" | "sdxl"); its tensors
    are taken out of ``state_dict`` as the encoders are built."""
    if arch not in _ARCH_SPECS:
        raise ValueError(f"no CLIP layout known for arch {arch!r}; expected one of {sorted(_ARCH_SPECS)}")
    encoders = {}
    for spec in _ARCH_SPECS[arch]:
        part = {k[len(spec.prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(spec.prefix)}
        if not part:
            raise ValueError(f"checkpoint has no CLIP-{spec.key} text encoder (no keys under {spec.prefix!r})")
        encoders[spec.key] = build_text_encoder(part, spec, device=device, dtype=dtype, storage_dtype=storage_dtype)
    return Clip(arch, encoders, embedding_dirs)
