"""CLIP text encoders: checkpoint layouts, ComfyUI layer selection, weighting, pooled output, nodes."""
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from kiln.nodes import registry
from kiln.kernels.prompt_syntax import apply_weight
from kiln.nodes.models.clip import build_clip, heads_for_width
from kiln.nodes.models.synthetic_clip import clip_state_dict
from kiln.nodes.models.tokenizer import EOS_TOKEN
from kiln.nodes.values import ClipHandle

PROMPT = "a photo of an astronaut riding a horse, (highly detailed:1.2)"


@pytest.fixture(scope="module")
def sds():
    return {arch: clip_state_dict(arch) for arch in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="module")
def clips(sds):
    return {arch: build_clip(dict(sd), arch) for arch, sd in sds.items()}   # build_clip takes the tensors out


def reference_encode(sd, prefix, layout, ids, stop=None):
    """ComfyUI's clip_model forward written from the raw checkpoint tensors (fp16-rounded weights,
    fp32 compute, einsum attention as attention_basic). OpenCLIP layout is used as OpenCLIP does:
    one fused in_proj, ``x @ text_projection``. Returns (final normed, layer ``stop`` output, pooled, projected)."""
    def w(name):
        return sd[prefix + name].half().float()

    hf = layout == "hf"
    p = "text_model." if hf else ""
    tok = w(f"{p}embeddings.token_embedding.weight" if hf else "token_embedding.weight")
    pos = w(f"{p}embeddings.position_embedding.weight" if hf else "positional_embedding")
    width = tok.shape[1]
    heads = heads_for_width(width)
    blocks = f"{p}encoder.layers." if hf else "transformer.resblocks."
    n_layers = len({k[len(prefix + blocks):].split(".")[0] for k in sd if k.startswith(prefix + blocks)})
    x = F.embedding(ids, tok) + pos
    b, t, _ = x.shape
    mask = torch.full((t, t), float("-inf")).triu_(1)
    inter = None
    for i in range(n_layers):
        if hf:
            L = f"{p}encoder.layers.{i}."
            ln1, ln2 = (w(L + "layer_norm1.weight"), w(L + "layer_norm1.bias")), (w(L + "layer_norm2.weight"), w(L + "layer_norm2.bias"))
            h = F.layer_norm(x, (width,), *ln1, eps=1e-5)
            q, k, v = (F.linear(h, w(L + f"self_attn.{n}.weight"), w(L + f"self_attn.{n}.bias")) for n in ("q_proj", "k_proj", "v_proj"))
            out_w, out_b = w(L + "self_attn.out_proj.weight"), w(L + "self_attn.out_proj.bias")
            fc1, fc2 = (w(L + "mlp.fc1.weight"), w(L + "mlp.fc1.bias")), (w(L + "mlp.fc2.weight"), w(L + "mlp.fc2.bias"))
            act = lambda a: a * torch.sigmoid(1.702 * a)  # noqa: E731  quick_gelu
        else:
            L = f"transformer.resblocks.{i}."
            ln1, ln2 = (w(L + "ln_1.weight"), w(L + "ln_1.bias")), (w(L + "ln_2.weight"), w(L + "ln_2.bias"))
            h = F.layer_norm(x, (width,), *ln1, eps=1e-5)
            q, k, v = F.linear(h, w(L + "attn.in_proj_weight"), w(L + "attn.in_proj_bias")).chunk(3, dim=-1)
            out_w, out_b = w(L + "attn.out_proj.weight"), w(L + "attn.out_proj.bias")
            fc1, fc2 = (w(L + "mlp.c_fc.weight"), w(L + "mlp.c_fc.bias")), (w(L + "mlp.c_proj.weight"), w(L + "mlp.c_proj.bias"))
            act = F.gelu
        d = width // heads
        q, k, v = (z.reshape(b, t, heads, d).permute(0, 2, 1, 3).reshape(b * heads, t, d) for z in (q, k, v))
        sim = torch.einsum("bid,bjd->bij", q, k) * d ** -0.5 + mask
        o = torch.einsum("bij,bjd->bid", sim.softmax(dim=-1), v)
        o = o.reshape(b, heads, t, d).permute(0, 2, 1, 3).reshape(b, t, width)
        x = x + F.linear(o, out_w, out_b)
        x = x + F.linear(act(F.linear(F.layer_norm(x, (width,), *ln2, eps=1e-5), *fc1)), *fc2)
        if stop is not None and i == stop % n_layers:
            inter = x
    fin = (w(f"{p}final_layer_norm.weight"), w(f"{p}final_layer_norm.bias")) if hf else (w("ln_final.weight"), w("ln_final.bias"))
    normed = lambda z: F.layer_norm(z, (width,), *fin, eps=1e-5)  # noqa: E731
    last = normed(x)
    pooled = last[torch.arange(b), (ids == EOS_TOKEN).int().argmax(-1)]
    projected = pooled @ w("text_projection") if not hf else pooled
    return last, inter, normed, pooled, projected


def _ids(clip, text, key):
    return torch.tensor([[t for t, _ in chunk] for chunk in clip.tokenize(text)[key]])


def test_clip_is_a_clip_handle(clips):
    assert all(isinstance(c, ClipHandle) for c in clips.values())


def test_heads_rule():
    assert [heads_for_width(w) for w in (32, 48, 64, 768, 1024, 1280)] == [2, 3, 4, 12, 16, 20]


def test_sd1_last_layer_matches_reference(sds, clips):
    clip = clips["sd1"]
    cond, pooled = clip.encode("a photo of a cat", return_pooled=True)
    last, _, _, ref_pooled, _ = reference_encode(sds["sd1"], "cond_stage_model.transformer.", "hf",
                                                 _ids(clip, "a photo of a cat", "l"))
    assert cond.shape == (1, 77, 32) and pooled.shape == (1, 32)
    assert (cond - last).abs().max() <= 1e-6
    assert (pooled - ref_pooled).abs().max() <= 1e-6  # SD1: unprojected EOS state


def test_sd2_openclip_conversion_matches_reference(sds, clips):
    clip = clips["sd2"]
    cond, pooled = clip.encode("a photo of a cat", return_pooled=True)
    _, inter, normed, _, projected = reference_encode(sds["sd2"], "cond_stage_model.model.", "openclip",
                                                      _ids(clip, "a photo of a cat", "h"), stop=-2)
    assert cond.shape == (1, 77, 48) and pooled.shape == (1, 48)
    assert (cond - normed(inter)).abs().max() <= 1e-5  # SD2 default: penultimate + final norm
    assert (pooled - projected).abs().max() <= 1e-5    # pooled @ text_projection (OpenCLIP orientation)


def test_sdxl_concatenates_l_and_g_and_pools_g(sds, clips):
    clip = clips["sdxl"]
    cond, pooled = clip.encode("a photo of a cat", return_pooled=True)
    assert cond.shape == (1, 77, 32 + 64) and pooled.shape == (1, 64)
    _, inter_l, _, _, _ = reference_encode(sds["sdxl"], "conditioner.embedders.0.transformer.", "hf",
                                           _ids(clip, "a photo of a cat", "l"), stop=-2)
    _, inter_g, _, _, proj_g = reference_encode(sds["sdxl"], "conditioner.embedders.1.model.", "openclip",
                                                _ids(clip, "a photo of a cat", "g"), stop=-2)
    assert (cond[..., :32] - inter_l).abs().max() <= 1e-5  # penultimate, no final layer norm
    assert (cond[..., 32:] - inter_g).abs().max() <= 1e-5
    assert (pooled - proj_g).abs().max() <= 1e-5


def test_tokens_per_encoder(clips):
    assert set(clips["sd1"].tokenize("x")) == {"l"}
    assert set(clips["sd2"].tokenize("x")) == {"h"}
    toks = clips["sdxl"].tokenize("x")
    assert set(toks) == {"l", "g"}
    assert toks["l"][0][3][0] == EOS_TOKEN and toks["g"][0][3][0] == 0  # CLIP-L pads with EOS, bigG with 0


def test_weights_rounded_through_fp16(sds):
    sd = sds["sd1"]
    ref = build_clip(dict(sd), "sd1").encode(PROMPT)
    from_fp16 = build_clip({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, "sd1").encode(PROMPT)
    exact = build_clip(dict(sd), "sd1", storage_dtype=None).encode(PROMPT)
    assert torch.equal(ref, from_fp16)
    assert (ref - exact).abs().max() > 1e-5


def test_layer_selection_sd1(clips):
    clip = clips["sd1"]
    default = clip.encode(PROMPT)
    assert torch.equal(clip.clip_layer(-1).encode(PROMPT), default)   # -1 + final norm == last
    assert torch.equal(clip.clip_layer(-24).encode(PROMPT), default)  # beyond the depth: last
    assert (clip.clip_layer(-2).encode(PROMPT) - default).abs().max() > 1e-2
    assert clip.layer_idx is None  # clip_layer returns a copy


def test_layer_selection_sdxl(sds, clips):
    clip = clips["sdxl"]
    default = clip.encode(PROMPT)
    assert torch.equal(clip.clip_layer(-2).encode(PROMPT), default)
    last_unnormed = clip.clip_layer(-1).encode("a photo of a cat")
    ids = _ids(clip, "a photo of a cat", "l")
    _, inter, _, _, _ = reference_encode(sds["sdxl"], "conditioner.embedders.0.transformer.", "hf", ids, stop=-1)
    assert (last_unnormed[..., :32] - inter).abs().max() <= 1e-5  # -1 on SDXL: last layer, no final norm
    assert (clip.clip_layer(-1).encode(PROMPT) - default).abs().max() > 1e-2


def test_prompt_weight_interpolation(clips):
    clip = clips["sd1"]
    enc = clip.encoders["l"]
    tokens = clip.tokenize("a photo of a (cat:1.3)")
    weighted = clip.encode_from_tokens(tokens)
    ids = [t for t, _ in tokens["l"][0]]
    z, _ = enc.encode([ids, [49406, 49407] + [49407] * 75])  # the prompt and the empty prompt, one batch
    cat = 5
    expected = z[0].clone()
    expected[cat] = (z[0][cat] - z[1][cat]) * 1.3 + z[1][cat]  # ComfyUI's formula with a Python float
    assert torch.equal(weighted[0], expected)
    assert torch.equal(weighted[0, :cat], z[0, :cat])  # weight-1 tokens untouched, not recomputed
    w = torch.tensor(2.0)
    assert torch.allclose(apply_weight(torch.tensor(3.0), torch.tensor(1.0), w), torch.tensor(5.0))


def test_long_prompt_concatenates_chunks(clips):
    clip = clips["sd2"]
    text = "cat " * 80 + "(dog:0.8)"
    cond, pooled = clip.encode(text, return_pooled=True)
    assert cond.shape == (1, 154, 48)
    first_chunk = [[t for t, _ in clip.tokenize(text)["h"][0]]]
    z, p = clip.encoders["h"].encode(first_chunk)
    assert (pooled - p).abs().max() <= 1e-6  # pooled comes from the first chunk
    assert (cond[:, :77] - z).abs().max() <= 1e-6  # all weights 1 in chunk 1


def test_embedding_in_prompt(tmp_path, sds):
    vec = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    safetensors.torch.save_file({"emb_params": vec}, str(tmp_path / "tiny.safetensors"))
    clip = build_clip(dict(sds["sd1"]), "sd1", embedding_dirs=[str(tmp_path)])
    cond = clip.encode("a embedding:tiny cat")
    table = sds["sd1"]["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    sd = dict(sds["sd1"])  # same model, the vector appended to the vocabulary as ComfyUI does
    sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.cat([table, vec])
    ids = torch.tensor([[49406, 320, table.shape[0], 2368, 49407] + [49407] * 72])
    last, _, _, _, _ = reference_encode(sd, "cond_stage_model.transformer.", "hf", ids)
    assert (cond - last).abs().max() <= 1e-6


def test_nodes(clips):
    from kiln.nodes import text

    encode = registry._REGISTRY["CLIPTextEncode"]
    assert [i.name for i in encode.inputs] == ["text", "clip"] and encode.outputs == ("CONDITIONING",)
    assert encode.input("text").multiline
    last = registry._REGISTRY["CLIPSetLastLayer"]
    spec = last.input("stop_at_clip_layer")
    assert (spec.default, spec.min, spec.max) == (-1, -24, -1) and last.outputs == ("CLIP",)
    (cond,) = text.clip_text_encode(text=PROMPT, clip=clips["sdxl"])
    assert len(cond) == 1 and cond[0][0].shape == (1, 77, 96) and cond[0][1]["pooled_output"].shape == (1, 64)
    (clip2,) = text.clip_set_last_layer(clip=clips["sd1"], stop_at_clip_layer=-2)
    assert clip2.layer_idx == -2 and clips["sd1"].layer_idx is None
    assert not math.isnan(float(cond[0][0].sum()))


def test_sd1_layout_without_text_model_level(sds, clips):
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in sds["sd1"].items()}
    assert torch.equal(build_clip(old, "sd1").encode(PROMPT), clips["sd1"].encode(PROMPT))


def test_missing_encoder_is_reported(sds):
    with pytest.raises(ValueError, match="no CLIP-g"):
        build_clip({k: v for k, v in sds["sdxl"].items() if not k.startswith("conditioner.embedders.1.")}, "sdxl")


def test_full_size_clip_l_matches_reference():
    sd = clip_state_dict("sd1", "full")
    clip = build_clip(dict(sd), "sd1")
    assert clip.encoders["l"].model.config.num_attention_heads == 12
    text = "a photo of an astronaut riding a horse, " * 3
    ids = _ids(clip, text, "l")
    for c, stop in ((clip, None), (clip.clip_layer(-2), -2)):
        cond = c.encode(text)
        last, inter, normed, _, _ = reference_encode(sd, "cond_stage_model.transformer.", "hf", ids, stop=stop)
        assert cond.shape == (1, 77, 768)
        assert (cond - (last if stop is None else normed(inter))).abs().max() <= 1e-5
