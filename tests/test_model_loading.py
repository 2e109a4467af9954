"""Checkpoint / VAE loading: detection, strict weight mapping, numerics against an independent
LDM reference written from the original layer definitions, and ModelFileError messages."""
from __future__ import annotations

import math
import socket

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from fixtures_models import tiny_checkpoint, tiny_vae
from kiln.nodes.models.checkpoint import ModelFileError, load_checkpoint, load_state_dict, load_vae
from kiln.nodes.models.detect import check_conversion, detect_model
from kiln.nodes.models.synthetic import UNETS, VAES, unet_shapes, vae_shapes
from kiln.nodes.models.unet import diffusers_config
from kiln.nodes.values import DiffusionModelHandle, VaeHandle

U = "model.diffusion_model."


# --- an independent LDM reference (openaimodel.py / model.py semantics on raw file tensors) ---------

class Ref:
    def __init__(self, sd: dict[str, torch.Tensor], prefix: str):
        self.sd, self.p = sd, prefix

    def has(self, k):
        return self.p + k in self.sd

    def w(self, k):
        return self.sd[self.p + k].float()

    def lin(self, k, h):
        return F.linear(h, self.w(k + ".weight"), self.w(k + ".bias") if self.has(k + ".bias") else None)

    def conv(self, k, h, stride=1, pad=1):
        return F.conv2d(h, self.w(k + ".weight"), self.w(k + ".bias"), stride, pad)

    def gn(self, k, h, eps):
        return F.group_norm(h, 32, self.w(k + ".weight"), self.w(k + ".bias"), eps)

    def ln(self, k, h):
        return F.layer_norm(h, h.shape[-1:], self.w(k + ".weight"), self.w(k + ".bias"))


def attention(q, k, v, heads):
    b, n, c = q.shape
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, n, c)


def ref_unet(sd, x, t, context, y, heads_of):
    r = Ref(sd, U)
    mc = r.w("input_blocks.0.0.weight").shape[0]

    def res(k, h, emb):
        o = r.conv(k + ".in_layers.2", F.silu(r.gn(k + ".in_layers.0", h, 1e-5)))
        o = o + r.lin(k + ".emb_layers.1", F.silu(emb))[:, :, None, None]
        o = r.conv(k + ".out_layers.3", F.silu(r.gn(k + ".out_layers.0", o, 1e-5)))
        return (r.conv(k + ".skip_connection", h, pad=0) if r.has(k + ".skip_connection.weight") else h) + o

    def attn(k, h, ctx, heads):
        return r.lin(k + ".to_out.0", attention(r.lin(k + ".to_q", h), r.lin(k + ".to_k", ctx),
                                                 r.lin(k + ".to_v", ctx), heads))

    def transformer(k, h):
        b, c, hh, ww = h.shape
        heads, linear = heads_of(c), r.w(k + ".proj_in.weight").ndim == 2
        o = r.gn(k + ".norm", h, 1e-6)
        if not linear:
            o = r.conv(k + ".proj_in", o, pad=0)
        o = o.flatten(2).transpose(1, 2)
        if linear:
            o = r.lin(k + ".proj_in", o)
        d = 0
        while r.has(f"{k}.transformer_blocks.{d}.norm1.weight"):
            blk = f"{k}.transformer_blocks.{d}"
            n1 = r.ln(blk + ".norm1", o)
            o = attn(blk + ".attn1", n1, n1, heads) + o
            o = attn(blk + ".attn2", r.ln(blk + ".norm2", o), context, heads) + o
            a, gate = r.lin(blk + ".ff.net.0.proj", r.ln(blk + ".norm3", o)).chunk(2, dim=-1)
            o = r.lin(blk + ".ff.net.2", a * F.gelu(gate)) + o
            d += 1
        if linear:
            o = r.lin(k + ".proj_out", o)
        o = o.transpose(1, 2).reshape(b, c, hh, ww)
        if not linear:
            o = r.conv(k + ".proj_out", o, pad=0)
        return o + h

    half = mc // 2
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    emb = r.lin("time_embed.2", F.silu(r.lin("time_embed.0", torch.cat([args.cos(), args.sin()], -1))))
    if y is not None:
        emb = emb + r.lin("label_emb.0.2", F.silu(r.lin("label_emb.0.0", y)))
    h, skips, i = r.conv("input_blocks.0.0", x), [], 1
    skips.append(h)
    while r.has(f"input_blocks.{i}.0.op.weight") or r.has(f"input_blocks.{i}.0.in_layers.0.weight"):
        k = f"input_blocks.{i}"
        if r.has(k + ".0.op.weight"):
            h = r.conv(k + ".0.op", h, stride=2)
        else:
            h = res(k + ".0", h, emb)
            if r.has(k + ".1.norm.weight"):
                h = transformer(k + ".1", h)
        skips.append(h)
        i += 1
    h = res("middle_block.2", transformer("middle_block.1", res("middle_block.0", h, emb)), emb)
    for i in range(len(skips)):
        k = f"output_blocks.{i}"
        h = res(k + ".0", torch.cat([h, skips.pop()], dim=1), emb)
        layer = 1
        if r.has(k + ".1.norm.weight"):
            h, layer = transformer(k + ".1", h), 2
        if r.has(f"{k}.{layer}.conv.weight"):
            h = r.conv(f"{k}.{layer}.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return r.conv("out.2", F.silu(r.gn("out.0", h, 1e-5)))


def ref_vae(sd, prefix):
    r = Ref(sd, prefix)

    def res(k, h):
        o = r.conv(k + ".conv1", F.silu(r.gn(k + ".norm1", h, 1e-6)))
        o = r.conv(k + ".conv2", F.silu(r.gn(k + ".norm2", o, 1e-6)))
        return (r.conv(k + ".nin_shortcut", h, pad=0) if r.has(k + ".nin_shortcut.weight") else h) + o

    def mid(k, h):
        h = res(k + ".block_1", h)
        n = r.gn(k + ".attn_1.norm", h, 1e-6)
        b, c, hh, ww = n.shape
        q, kk, v = (r.conv(f"{k}.attn_1.{m}", n, pad=0).reshape(b, c, -1) for m in "qkv")
        w = torch.softmax(q.transpose(1, 2) @ kk * c ** -0.5, dim=-1)
        h = h + r.conv(k + ".attn_1.proj_out", (v @ w.transpose(1, 2)).reshape(b, c, hh, ww), pad=0)
        return res(k + ".block_2", h)

    def encode(x):
        h, i = r.conv("encoder.conv_in", x), 0
        while r.has(f"encoder.down.{i}.block.0.conv1.weight"):
            j = 0
            while r.has(f"encoder.down.{i}.block.{j}.conv1.weight"):
                h, j = res(f"encoder.down.{i}.block.{j}", h), j + 1
            if r.has(f"encoder.down.{i}.downsample.conv.weight"):
                h = r.conv(f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, pad=0)
            i += 1
        h = r.conv("encoder.conv_out", F.silu(r.gn("encoder.norm_out", mid("encoder.mid", h), 1e-6)))
        return r.conv("quant_conv", h, pad=0).chunk(2, dim=1)[0]

    def decode(z):
        h = mid("decoder.mid", r.conv("decoder.conv_in", r.conv("post_quant_conv", z, pad=0)))
        i = 0
        while r.has(f"decoder.up.{i + 1}.block.0.conv1.weight"):
            i += 1
        for lvl in range(i, -1, -1):
            j = 0
            while r.has(f"decoder.up.{lvl}.block.{j}.conv1.weight"):
                h, j = res(f"decoder.up.{lvl}.block.{j}", h), j + 1
            if r.has(f"decoder.up.{lvl}.upsample.conv.weight"):
                h = r.conv(f"decoder.up.{lvl}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return r.conv("decoder.conv_out", F.silu(r.gn("decoder.norm_out", h, 1e-6)))

    return encode, decode


# --- fixtures ------------------------------------------------------------------------------------

CASES = {
    "sd1": dict(arch="sd1"),
    "sd2": dict(arch="sd2"),
    "sd2_v": dict(arch="sd2", v_prediction=True),
    "sdxl": dict(arch="sdxl"),
    "sd1_inpaint": dict(arch="sd1", inpainting=True),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {name: tiny_checkpoint(d, **kw) for name, kw in CASES.items()}


@pytest.fixture(scope="module")
def loaded(files):
    return {name: load_checkpoint(path) for name, path in files.items()}


# --- detection -----------------------------------------------------------------------------------

EXPECTED = {  # arch, prediction, in_ch, model_channels, channel_mult, res blocks, depth in, depth out, linear, adm
    "sd1": ("sd1", "eps", 4, 32, (1, 2), (1, 1), (1, 0), (1, 1, 0, 0), False, None),
    "sd2": ("sd2", "eps", 4, 64, (1, 1, 1, 1), (2,) * 4, (1, 1) + (0,) * 6, (1, 1, 1) + (0,) * 9, True, None),
    "sd2_v": ("sd2", "v", 4, 64, (1, 1, 1, 1), (2,) * 4, (1, 1) + (0,) * 6, (1, 1, 1) + (0,) * 9, True, None),
    "sdxl": ("sdxl", "eps", 4, 64, (1, 2), (1, 1), (0, 2), (0, 0, 2, 2), True, 64 + 6 * 32),
    "sd1_inpaint": ("sd1", "eps", 9, 32, (1, 2), (1, 1), (1, 0), (1, 1, 0, 0), False, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_detection(files, name):
    info = detect_model(load_state_dict(files[name]))
    u = info.unet
    got = (info.arch, info.prediction, u.in_channels, u.model_channels, u.channel_mult, u.num_res_blocks,
           u.transformer_depth, u.transformer_depth_output, u.use_linear_in_transformer, u.adm_in_channels)
    assert got == EXPECTED[name]
    assert u.context_dim == {"sd1": 32, "sd2": 48, "sdxl": 96}[info.arch]  # the tiny CLIP widths
    assert info.latent_format.scale_factor == (0.13025 if info.arch == "sdxl" else 0.18215)
    assert (info.heads(64), info.heads(128)) == ((8, 8) if info.arch == "sd1" else (1, 2))
    assert info.adm_embed_dim == (32 if info.arch == "sdxl" else None)


# Real sizes, checked on meta tensors (no memory): ComfyUI's unet_config tables
# (model_detection.unet_config_from_diffusers_unet) and the published parameter counts.
FULL = {
    "sd1": (768, None, 859_520_964, ((1, 1, 1, 1, 1, 1, 0, 0), (1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0), 1, False, None),
            8),
    "sd2": (1024, None, 865_910_724, ((1, 1, 1, 1, 1, 1, 0, 0), (1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0), 1, True, None),
            [5, 10, 20, 20]),
    "sdxl": (2048, 1280, 2_567_463_684, ((0, 0, 2, 2, 10, 10), (0, 0, 0, 2, 2, 2, 10, 10, 10), 10, True, 2816),
             [5, 10, 20]),
}


@pytest.mark.parametrize("arch", sorted(FULL))
def test_full_size_layouts_match_real_models(arch):
    context, pooled, params, comfy, heads = FULL[arch]
    shapes = unet_shapes(UNETS["full"][arch], context, 4, pooled)
    sd = {U + k: torch.empty(shape, device="meta") for k, (shape, _) in shapes.items()}
    assert sum(t.numel() for t in sd.values()) == params
    probe = U + "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # SD2's v-prediction probe is read
    if probe in sd:
        sd[probe] = torch.zeros(sd[probe].shape)
    info = detect_model(sd)
    u = info.unet
    assert info.arch == arch and u.model_channels == 320 and u.context_dim == context
    assert (u.transformer_depth, u.transformer_depth_output, u.transformer_depth_middle,
            u.use_linear_in_transformer, u.adm_in_channels) == comfy
    config = diffusers_config(info)
    assert config["attention_head_dim"] == ([8] * 4 if heads == 8 else heads)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    expected = {k: v.shape for k, v in unet.state_dict().items()}
    check_conversion(sd, convert_ldm_unet_checkpoint(sd, config), expected, "UNet")
    vae_params = sum(math.prod(shape) for shape, _ in vae_shapes(VAES["full"]).values())
    assert vae_params == 83_653_863


def test_sdxl_v_pred_key(tmp_path):
    info = detect_model(load_state_dict(tiny_checkpoint(tmp_path, "sdxl", v_prediction=True)))
    assert (info.arch, info.prediction) == ("sdxl", "v")


def test_without_text_encoder_family_from_unet(files, tmp_path):
    for name in ("sd1", "sd2", "sdxl"):
        sd = {k: v for k, v in load_state_dict(files[name]).items() if k.startswith((U, "first_stage_model."))}
        path = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file(sd, str(path))
        if name == "sdxl":  # tiny pooled width is unknowable without CLIP-G; real SDXL assumes 256
            with pytest.raises(ModelFileError, match="no CLIP-G text_projection"):
                load_checkpoint(path)
            continue
        model, clip, vae = load_checkpoint(path)
        assert (model.arch, clip, vae.latent_channels) == (name, None, 4)


# --- loading and numerics ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_unet_matches_ldm_reference(files, loaded, name):
    model, clip, vae = loaded[name]
    assert isinstance(model, DiffusionModelHandle) and isinstance(vae, VaeHandle)
    assert not any(p.is_meta for p in model.parameters())
    sd = load_state_dict(files[name])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.tensor([14.6146, 0.8])
    ctx = torch.randn(2, 5, model.info.unet.context_dim, generator=g)
    c_concat = torch.randn(2, 5, 8, 8, generator=g) if model.in_channels == 9 else None
    y = None
    if model.arch == "sdxl":
        y = model.encode_adm(torch.randn(2, 64, generator=g), width=64, height=48, crop_w=0, crop_h=8,
                             target_width=64, target_height=48)
    with torch.no_grad():
        out = model.apply_model(x, sigma, ctx, y=y, c_concat=c_concat)
        xc = x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        eps = ref_unet(sd, xc, model.model_sampling.timestep(sigma), ctx, y, model.info.heads)
    s = sigma[:, None, None, None]
    if model.info.prediction == "v":
        expected = x / (s ** 2 + 1) - eps * s / (s ** 2 + 1) ** 0.5
    else:
        expected = x - eps * s
    assert out.shape == x.shape and out.dtype == torch.float32 and out.isfinite().all()
    assert eps.std() > 0.1  # the random UNet is not degenerate
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_sdxl_y_feeds_label_emb(files, loaded):
    """y reaches the time embedding exactly as ComfyUI's label_emb(y) (Linear-SiLU-Linear)."""
    model = loaded["sdxl"][0]
    sd = load_state_dict(files["sdxl"])
    pooled = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    y = model.encode_adm(pooled, width=1024, height=768, crop_w=16, crop_h=32, target_width=1024,
                         target_height=768)
    assert y.shape == (1, 64 + 6 * 32)
    assert torch.equal(y[:, :64], pooled)
    # Embedding of height (first size slot): cat(cos, sin) of 768 * 10000^(-i/16).
    i = torch.arange(16, dtype=torch.float64)
    arg = 768 * torch.exp(-math.log(10000) * i / 16)
    torch.testing.assert_close(y[0, 64:96].double(), torch.cat([arg.cos(), arg.sin()]), atol=2e-4, rtol=0)
    crop_w = y[0, 64 + 3 * 32:64 + 4 * 32]  # order: height, width, crop_h, crop_w, target_h, target_w
    torch.testing.assert_close(crop_w[:1].double(), torch.tensor([math.cos(16.0)], dtype=torch.float64))

    seen = []
    hook = model.unet.class_embedding.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 96), y=y)
    hook.remove()
    r = Ref(sd, U)
    label_emb = r.lin("label_emb.0.2", F.silu(r.lin("label_emb.0.0", y)))
    torch.testing.assert_close(seen[0], label_emb, rtol=1e-5, atol=1e-6)
    assert model.unet.config.addition_embed_type is None


def test_encode_adm_is_none_for_sd1(loaded):
    assert loaded["sd1"][0].encode_adm(torch.zeros(1, 32), width=8, height=8, crop_w=0, crop_h=0,
                                       target_width=8, target_height=8) is None


def test_vae_matches_reference_and_clamps(files, loaded):
    vae = loaded["sd1"][2]
    encode, decode = ref_vae(load_state_dict(files["sd1"]), "first_stage_model.")
    pixels = torch.rand(2, 32, 24, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latent = vae.encode(pixels)
        ref_latent = encode(pixels.movedim(-1, 1) * 2 - 1)
        image = vae.decode(latent * 8)  # scaled up so the clamp engages
        ref_image = ((decode(latent * 8) + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert (vae.downscale_ratio, vae.latent_channels) == (8, 4)
    assert latent.shape == (2, 4, 4, 3) and image.shape == (2, 32, 24, 3)
    torch.testing.assert_close(latent, ref_latent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(image, ref_image, rtol=1e-4, atol=1e-5)
    assert image.min() == 0.0 and image.max() == 1.0 and 0.1 < image.std()


def test_vae_layouts_agree(files, loaded, tmp_path):
    ref = loaded["sd1"][2]
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    expected = ref.decode(z)
    ckpt_sd = load_state_dict(files["sd1"])
    bare = {k[len("first_stage_model."):]: v for k, v in ckpt_sd.items() if k.startswith("first_stage_model.")}
    diffusers_sd = dict(ref.model.state_dict())
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v for k, v in diffusers_sd.items()}
    for name, sd in (("ldm", bare), ("ldm_prefixed", {"first_stage_model." + k: v for k, v in bare.items()}),
                     ("diffusers", diffusers_sd), ("diffusers_legacy", legacy)):
        path = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        torch.testing.assert_close(load_vae(path).decode(z), expected, rtol=0, atol=0, msg=name)


def test_standalone_vae_file(tmp_path):
    for prefix in ("", "first_stage_model."):
        vae = load_vae(tiny_vae(tmp_path, prefix=prefix))
        assert vae.encode(torch.rand(1, 16, 16, 3)).shape == (1, 4, 2, 2)


def test_reduced_precision_and_dtype_outputs(files):
    model, _, vae = load_checkpoint(files["sd1"], dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and vae.dtype == torch.float32
    out = model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([2.0]), torch.randn(1, 4, 32))
    assert out.dtype == torch.float32 and out.isfinite().all()


def test_each_weight_is_held_once(files, monkeypatch):
    """The builders take each tensor out of the file's dict as they convert it (the fp16 file and the
    fp32 UNet never sit side by side), and the text encoders keep the fp16 weights themselves
    (ComfyUI's storage; cast to fp32 as each layer runs)."""
    import kiln.nodes.models.checkpoint as checkpoint

    read = {}
    monkeypatch.setattr(checkpoint, "load_state_dict", lambda path: read.setdefault("sd", load_state_dict(path)))
    model, clip, vae = load_checkpoint(files["sdxl"])
    assert read["sd"] == {}
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32} and vae.dtype == torch.float32
    for encoder in clip.encoders.values():
        assert {p.dtype for p in encoder.parameters()} == {torch.float16}


def test_loading_never_touches_the_network(files, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access during model loading")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model, clip, vae = load_checkpoint(files["sdxl"])
    assert model.arch == "sdxl" and clip is not None and vae is not None


# --- strictness and file errors ------------------------------------------------------------------

def _resaved(files, tmp_path, edit):
    sd = dict(load_state_dict(files["sd1"]))
    edit(sd)
    path = tmp_path / "edited.safetensors"
    safetensors.torch.save_file(sd, str(path))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.__setitem__(U + "extra.weight", torch.zeros(3)), "unused tensors: " + U + "extra.weight"),
    (lambda sd: sd.__setitem__(U + "input_blocks.1.0.extra.weight", torch.zeros(3)),
     "unexpected tensors: down_blocks.0.resnets.0.extra.weight"),
    (lambda sd: sd.pop(U + "out.2.bias"), "missing tensors: conv_out.bias"),
    (lambda sd: sd.__setitem__(U + "time_embed.2.bias", torch.zeros(7)), "wrong shapes: time_embedding.linear_2.bias"),
    (lambda sd: sd.pop("first_stage_model.decoder.conv_out.bias"), "VAE weights do not match"),
])
def test_strict_loading(files, tmp_path, edit, message):
    with pytest.raises(ModelFileError) as e:
        load_checkpoint(_resaved(files, tmp_path, edit))
    assert message in str(e.value) and "edited.safetensors" in str(e.value)


def test_ckpt_read_with_weights_only(files, tmp_path):
    sd = load_state_dict(files["sd1"])
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, path)
    assert load_state_dict(path).keys() == sd.keys()
    model = load_checkpoint(path)[0]
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 3, 32)
    expected = load_checkpoint(files["sd1"])[0].apply_model(x, torch.tensor([3.0]), ctx)
    assert torch.equal(model.apply_model(x, torch.tensor([3.0]), ctx), expected)


class Payload:
    """Any non-tensor object: unpickling it would run arbitrary code paths."""


def test_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(ModelFileError, match="other Python objects") as e:
        load_state_dict(path)
    assert "evil.ckpt" in str(e.value)


def test_corrupt_and_foreign_files(files, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["sd1"].read_bytes()[:5000])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"foo.weight": torch.zeros(2)}, str(foreign))
    flux = tmp_path / "flux.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale":
                                 torch.ones(2)}, str(flux))
    cases = [
        (truncated, "expected a safetensors file, found unreadable data"),
        (text, "expected a torch checkpoint, found unreadable data"),
        (foreign, "expected a Stable Diffusion checkpoint"),
        (flux, "found a Flux model"),
        (tmp_path / "missing.safetensors", "found nothing at this path"),
        (tmp_path / "model.onnx", "found '.onnx'"),
    ]
    (tmp_path / "model.onnx").write_bytes(b"x")
    for path, message in cases:
        with pytest.raises(ModelFileError) as e:
            load_checkpoint(path)
        assert message in str(e.value) and str(path) in str(e.value)


def test_refiner_layout_is_named(files, tmp_path):
    def refiner(sd):
        for k in [k for k in sd if k.startswith("cond_stage_model.")]:
            sd["conditioner.embedders.0.model." + k.split(".", 2)[2]] = sd.pop(k)
        sd[U + "label_emb.0.0.weight"] = torch.zeros(128, 10)
        sd[U + "label_emb.0.2.weight"] = torch.zeros(128, 128)
    with pytest.raises(ModelFileError, match="SDXL refiner"):
        load_checkpoint(_resaved(files, tmp_path, refiner))


def test_vae_loader_rejects_checkpoint_without_vae(tmp_path):
    path = tmp_path / "unet.safetensors"
    safetensors.torch.save_file({U + "input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}, str(path))
    with pytest.raises(ModelFileError, match="expected a VAE"):
        load_vae(path)
