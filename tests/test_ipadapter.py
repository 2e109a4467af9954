"""CLIP vision and the ComfyUI_IPAdapter_plus nodes: the encoder against transformers' own
forward, the attention patches against a UNet whose patched attentions are scaled by formula,
the projection models and embedding combinations against the pack's formulas, whole workflows,
and the refusals (including the seed document's IPAdapter graph)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kiln.api import run_workflow
from kiln.kernels.errors import KilnError
from kiln.nodes.models.checkpoint import load_checkpoint
from kiln.nodes.models.clip_vision import MEAN, STD, clip_preprocess, load_clip_vision
from kiln.nodes.models.detect import detect_model
from kiln.nodes.models.ipadapter import IPAdapterModule, IPAdapterPatch, adapter_kind, combine, read_ipadapter
from kiln.nodes.models.synthetic import write_checkpoint
from kiln.nodes.models.unet import diffusers_config
from kiln.runtime.plan import load_plan
from ipadapter_files import attention_sites, clip_vision_state_dict, ipadapter_state_dict
from lora_files import UNET, read, save
from plan_parity import BACKENDS, assert_parity, backend_compilers
from workflows import render, txt2img

VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"


def test_clip_vision_encodes_as_transformers_with_comfyuis_storage(tmp_path):
    sd = clip_vision_state_dict(seed=1)
    sd = {k: v.float() + (1e-4 if "pre_layrnorm.weight" in k else 0) for k, v in sd.items()}   # not fp16-exact
    vision = load_clip_vision(sd)
    model = vision.model
    assert torch.equal(model.vision_model.pre_layrnorm.weight, sd["vision_model.pre_layrnorm.weight"])   # fp32
    layer = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(model.get_parameter(layer), sd[layer].half().float())   # stored fp16
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ours = vision.encode_pixels(pixels)
    theirs = model(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.penultimate_hidden_states, theirs.hidden_states[-2], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.image_embeds, theirs.image_embeds, rtol=0, atol=1e-5)


def test_clip_preprocess_covers_crops_quantises_and_normalises():
    image = torch.rand(1, 60, 100, 3, generator=torch.Generator().manual_seed(0))
    got = clip_preprocess(image, size=224)
    resized = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(224, 373), mode="bicubic", antialias=True)
    expected = torch.clip(255.0 * resized[:, :, :, 74:298], 0, 255).round() / 255.0
    expected = (expected - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert got.shape == (1, 3, 224, 224) and torch.equal(got, expected)


class _KV(nn.Module):
    """An adapter module whose to_k_ip / to_v_ip are the UNet's own to_k / to_v."""

    def __init__(self, unet, sites, layers: int = 16):
        super().__init__()
        self.to_kvs = nn.ModuleDict()
        self.layers = layers
        for key, paths, _ in sites:
            attention = unet.get_submodule(paths[0])
            self.to_kvs[f"{key}_to_k_ip"], self.to_kvs[f"{key}_to_v_ip"] = attention.to_k, attention.to_v


def _transformer_order(sd: dict, names: dict) -> dict[str, int]:
    """attn2 path -> index of its SpatialTransformer in execution order (inputs, middle, outputs)."""
    import re

    rank = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}
    blocks = sorted({(m[1], int(m[2] or 0)) for k in sd
                     if (m := re.match(rf"{re.escape(UNET)}(input_blocks|middle_block|output_blocks)"
                                       r"\.?(\d*)\.1\.proj_in", k))}, key=lambda b: (rank[b[0]], b[1]))
    order = {}
    for t, (kind, block) in enumerate(blocks):
        prefix = f"{kind}.{block}.1" if kind != "middle_block" else "middle_block.1"
        for ldm, name in names.items():
            if ldm.startswith(prefix + ".transformer_blocks.") and ldm.endswith("attn2.to_k.weight"):
                order[name.rsplit(".to_k.", 1)[0]] = t
    return order


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("weight_type", ["linear", "ease in"])
def test_patched_attentions_equal_a_unet_with_scaled_outputs(arch, weight_type, tmp_path):
    """Image tokens equal to the text tokens through to_k/to_v make each patched attention's
    term ``w_t`` times its own output: the same as scaling its to_out weight by ``1 + w_t``."""
    from lora_files import unet_diffusers_names

    path = write_checkpoint(tmp_path / f"{arch}.safetensors", arch, seed=8)
    sd = read(path)
    model, _, _ = load_checkpoint(path)
    config = diffusers_config(detect_model(sd))
    sites = attention_sites(sd, config, per_transformer_block=arch == "sdxl")
    order = _transformer_order(sd, unet_diffusers_names(sd, config))
    g = torch.Generator().manual_seed(0)
    width = model.unet.config.cross_attention_dim
    positive, negative = torch.randn(1, 77, width, generator=g), torch.randn(1, 77, width, generator=g)
    patch = IPAdapterPatch(_KV(model.unet, sites), positive, negative, 0.7, weight_type, 1e9, 0.0)
    patched = model.with_ip_adapter(patch)
    scaled = dict(sd)
    names = {v: k for k, v in unet_diffusers_names(sd, config).items()}
    for _, paths, kind in sites:
        if kind == "middle_block":
            continue   # registered as ("middle", 1): never fires
        for p in paths:
            t = order[p]
            w = 0.7 if weight_type == "linear" else 0.7 * (0.05 + 0.95 * (1 - t / 16))
            key = UNET + names[p + ".to_out.0.weight"]
            scaled[key] = sd[key].float() * (1 + w)
    reference, _, _ = load_checkpoint(save(scaled, tmp_path / "scaled.safetensors"))
    x, sigma = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([2.0, 2.0])
    context = torch.cat([negative, positive])
    y = torch.randn(2, model.unet.config.projection_class_embeddings_input_dim, generator=g) if arch == "sdxl" else None
    got = patched.apply_model(x, sigma, context, y, cond_or_uncond=(1, 0))
    want = reference.apply_model(x, sigma, context, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, model.apply_model(x, sigma, context, y), atol=1e-3)


def _perceiver(x, latents, p, heads):
    """The pack's PerceiverAttention, written out."""
    ln = nn.functional.layer_norm
    d = latents.shape[-1]
    x, latents = ln(x, (d,), p["0.norm1.weight"], p["0.norm1.bias"]), ln(latents, (d,), p["0.norm2.weight"],
                                                                          p["0.norm2.bias"])
    q = latents @ p["0.to_q.weight"].T
    k, v = (torch.cat([x, latents], 1) @ p["0.to_kv.weight"].T).chunk(2, -1)
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
    w = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), -1)
    return ((w @ v).permute(0, 2, 1, 3).reshape(latents.shape[0], latents.shape[1], -1)) @ p["0.to_out.weight"].T


@pytest.mark.parametrize("kind", ["standard", "plus", "full"])
def test_projection_models_follow_the_pack(kind):
    sd = {k: v.float() for k, v in ipadapter_state_dict(kind, 32, 24 if kind == "standard" else 40, [32]).items()}
    model = read_ipadapter(sd, True, "x.safetensors")
    kind_info = adapter_kind(model)
    module = IPAdapterModule(model, kind_info)
    proj = model["image_proj"]
    ln = nn.functional.layer_norm
    gelu = nn.functional.gelu
    if kind == "standard":
        embeds = torch.randn(2, 24)
        want = ln((embeds @ proj["proj.weight"].T + proj["proj.bias"]).reshape(-1, 4, 32), (32,),
                  proj["norm.weight"], proj["norm.bias"])
    elif kind == "full":
        embeds = torch.randn(2, 257, 40)
        hidden = gelu(embeds @ proj["proj.0.weight"].T + proj["proj.0.bias"])
        want = ln(hidden @ proj["proj.2.weight"].T + proj["proj.2.bias"], (32,), proj["proj.3.weight"],
                  proj["proj.3.bias"])
    else:
        embeds = torch.randn(2, 257, 40)
        x = embeds @ proj["proj_in.weight"].T + proj["proj_in.bias"]
        latents = proj["latents"].repeat(2, 1, 1)
        for i in range(4):
            p = {k[len(f"layers.{i}."):]: v for k, v in proj.items() if k.startswith(f"layers.{i}.")}
            latents = _perceiver(x, latents, p, heads=2) + latents
            h = ln(latents, (128,), p["1.0.weight"], p["1.0.bias"])
            latents = gelu(h @ p["1.1.weight"].T) @ p["1.3.weight"].T + latents
        want = ln(latents @ proj["proj_out.weight"].T + proj["proj_out.bias"], (32,), proj["norm_out.weight"],
                  proj["norm_out.bias"])
    torch.testing.assert_close(module.image_proj_model(embeds), want, rtol=1e-4, atol=1e-5)


def test_combine_embeds():
    e = torch.randn(3, 5)
    assert torch.equal(combine(e, "concat"), e)
    torch.testing.assert_close(combine(e, "add"), e.sum(0, keepdim=True))
    torch.testing.assert_close(combine(e, "subtract"), (e[0] - e[1:].mean(0)).unsqueeze(0))
    torch.testing.assert_close(combine(e, "average"), e.mean(0, keepdim=True))
    torch.testing.assert_close(combine(e, "norm average"), (e / e.norm(dim=0, keepdim=True)).mean(0, keepdim=True))


# --- whole workflows ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ipa_models(tmp_path_factory):
    from kiln.demo import write_demo_models

    root = tmp_path_factory.mktemp("ipa-models")
    write_demo_models(root)
    ckpt = root / "checkpoints" / "tiny-sd15.safetensors"
    sd = read(ckpt)
    model, _, _ = load_checkpoint(ckpt)
    config = diffusers_config(detect_model(sd))
    widths = [model.unet.get_submodule(paths[0]).to_k.out_features
              for _, paths, _ in attention_sites(sd, config, False)]
    cross = model.unet.config.cross_attention_dim
    adapters = root / "ipadapter"
    save(clip_vision_state_dict(), root / "clip_vision" / VISION)
    save(ipadapter_state_dict("standard", cross, 24, widths, seed=1), adapters / "ip-adapter_sd15.safetensors")
    save(ipadapter_state_dict("plus", cross, 32, widths, seed=2), adapters / "ip-adapter-plus_sd15.safetensors")
    save(ipadapter_state_dict("standard", cross + 8, 24, widths, seed=3), adapters / "other-model.safetensors")
    inputs = tmp_path_factory.mktemp("ipa-input")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(inputs / "face.png")
    return root, inputs


def _simple(preset="STANDARD (medium strength)", weight=1.0, start=0.0, end=1.0, weight_type="standard") -> dict:
    workflow = txt2img()
    workflow.update({
        "30": {"class_type": "IPAdapterUnifiedLoader", "inputs": {"model": ["4", 0], "preset": preset}},
        "31": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "32": {"class_type": "IPAdapter", "inputs": {"model": ["30", 0], "ipadapter": ["30", 1], "image": ["31", 0],
                                                    "weight": weight, "start_at": start, "end_at": end,
                                                    "weight_type": weight_type}},
    })
    workflow["3"]["inputs"]["model"] = ["32", 0]
    return workflow


def _advanced(adapter="ip-adapter-plus_sd15.safetensors", **inputs) -> dict:
    workflow = txt2img()
    workflow.update({
        "30": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": adapter}},
        "33": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VISION}},
        "31": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "32": {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": ["4", 0], "ipadapter": ["30", 0], "image": ["31", 0], "clip_vision": ["33", 0], "weight": 0.8,
            "weight_type": "ease in-out", "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
            "embeds_scaling": "K+V", **inputs}},
    })
    workflow["3"]["inputs"]["model"] = ["32", 0]
    return workflow


def test_ipadapter_workflows(ipa_models, tmp_path):
    models, inputs = ipa_models
    plain = render(txt2img(), models, inputs, tmp_path / "plain")
    simple = render(_simple(), models, inputs, tmp_path / "simple")
    plus = render(_simple(preset="PLUS (high strength)", weight_type="style transfer"), models, inputs,
                  tmp_path / "plus")
    advanced = render(_advanced(), models, inputs, tmp_path / "advanced")
    assert len({plain.tobytes(), simple.tobytes(), plus.tobytes(), advanced.tobytes()}) == 4
    assert np.array_equal(render(_simple(weight=0.0), models, inputs, tmp_path / "w0"), plain)
    assert np.array_equal(render(_simple(start=1.0, end=1.0), models, inputs, tmp_path / "never"), plain)


def test_the_seed_documents_ipadapter_graph_is_refused_with_the_fix(ipa_models, tmp_path):
    models, inputs = ipa_models
    workflow = _simple()
    node = workflow["32"]["inputs"]
    del node["start_at"], node["end_at"]
    node.update(weight_type="linear", clip_vision=["33", 0], combine_embeds="concat")
    workflow["33"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VISION}}
    with pytest.raises(KilnError) as failure:
        run_workflow(workflow, models=models, input_dir=inputs, output_dir=tmp_path)
    found = {(p.code, p.input_name) for p in failure.value.problems if p.node_id == "32"}
    assert found == {("required_input_missing", "start_at"), ("required_input_missing", "end_at"),
                     ("value_not_in_list", "weight_type")}
    assert all("IPAdapterAdvanced" in (p.hint or "") for p in failure.value.problems if p.node_id == "32")
    assert not list(tmp_path.glob("*.png"))


def test_an_ipadapter_for_another_model_is_refused(ipa_models, tmp_path):
    models, inputs = ipa_models
    with pytest.raises(KilnError) as failure:
        run_workflow(_advanced("other-model.safetensors", embeds_scaling="V only"), models=models, input_dir=inputs,
                     output_dir=tmp_path)
    (problem,) = failure.value.problems
    assert (problem.node_id, problem.input_name) == ("32", "ipadapter") and "another model" in problem.message


def test_a_missing_preset_file_names_the_pattern(ipa_models, tmp_path):
    models, inputs = ipa_models
    with pytest.raises(KilnError) as failure:
        run_workflow(_simple(preset="PLUS FACE (portraits)"), models=models, input_dir=inputs, output_dir=tmp_path)
    (problem,) = failure.value.problems
    assert problem.input_name == "preset" and "plus.face.sd15" in problem.expected


@pytest.fixture(scope="module")
def ipa_build(ipa_models, tmp_path_factory):
    return backend_compilers(*ipa_models, tmp_path_factory, "ipa")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipadapter_plans_match_the_interpreter(ipa_models, ipa_build, tmp_path, backend):
    """IP-Adapter inside the compiled denoiser: the image embeds are folded (the vision encoder
    is dropped from the plan), the attention terms, weight curve, negative embeds and the
    start/end window (a select on sigma) run in the exported UNet."""
    models, inputs = ipa_models
    workflow = _advanced(start_at=0.2, end_at=0.7, image_negative=["31", 0])
    plan = ipa_build[backend]("advanced", workflow)
    loaded = load_plan(plan)
    assert [s.kind for s in loaded.manifest.stages] == ["sample", "module", "save_image"]
    assert f"{VISION} (CLIP_VISION)" in loaded.manifest.dropped_models
    assert_parity(workflow, loaded, tmp_path, models, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_runtime_reference_image_is_encoded_at_run_time(ipa_models, ipa_build, tmp_path, backend):
    """``--input 31.image``: a load_image stage, a module stage with the vision encoder and the
    projection computing the tokens, which the compiled denoiser reads in place of the patch's
    embeds; the negative image (a constant here) is encoded in the same stage."""
    models, inputs = ipa_models
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(inputs / "other.png")
    workflow = _advanced(start_at=0.2, end_at=0.7, image_negative=["35", 0])
    workflow["35"] = {"class_type": "LoadImage", "inputs": {"image": "other.png"}}
    constant = ipa_build[backend]("reference-constant", workflow)
    plan_path = ipa_build[backend]("reference-runtime", workflow, inputs=("31.image",))
    plan = load_plan(plan_path)
    stages = plan.manifest.stages
    assert [s.kind for s in stages] == ["load_image", "module", "sample", "module", "save_image"]
    assert sorted(n for n in stages[2].inputs if n.startswith("bound.")) == ["bound.32.0.ip_cond",
                                                                             "bound.32.0.ip_uncond"]
    vision = sum(t.numel() * 4 for t in clip_vision_state_dict().values())
    assert plan_path.stat().st_size > constant.stat().st_size + vision * 0.9   # the encoder is in this one only
    assert f"{VISION} (CLIP_VISION)" not in plan.manifest.dropped_models
    assert f"{VISION} (CLIP_VISION)" in load_plan(constant).manifest.dropped_models
    assert_parity(workflow, plan, tmp_path / "default", models, inputs)
    swapped = dict(workflow, **{"31": {"class_type": "LoadImage", "inputs": {"image": "other.png"}}})
    assert_parity(swapped, plan, tmp_path / "other", models, inputs, values={"31.image": "other.png"})
    assert not np.array_equal(render(workflow, models, inputs, tmp_path / "a"),
                              render(swapped, models, inputs, tmp_path / "b"))


def test_a_runtime_image_for_a_node_that_needs_it_at_compile_time_is_refused(ipa_models, ipa_build):
    """IPAdapter is evaluated when the plan compiles: its image may be a run-time value, not its mask."""
    models, inputs = ipa_models
    workflow = _advanced()
    workflow["32"]["inputs"]["attn_mask"] = ["31", 1]
    with pytest.raises(KilnError) as failure:
        ipa_build["onnx"]("refused", workflow, inputs=("31.image",))
    problem = failure.value.problems[-1]
    assert (problem.node_id, problem.class_type, problem.input_name) == ("32", "IPAdapterAdvanced", "attn_mask")
    assert "only its image, image_negative may be run-time values" in problem.message
    assert problem.found == "attn_mask reads node 31 (LoadImage)"


@pytest.mark.slow
def test_simple_ipadapter_plan_with_a_runtime_prompt(ipa_models, ipa_build, tmp_path):
    models, inputs = ipa_models
    workflow = _simple(preset="PLUS (high strength)", weight_type="style transfer", end=0.5)
    plan = ipa_build["aoti"]("simple", workflow, inputs=["6.text"])
    assert_parity(workflow, plan, tmp_path, models, inputs, values={"6.text": "a (blue:1.2) bird"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ipadapter_mask_compiles_at_the_plans_size(ipa_models, ipa_build, tmp_path, backend):
    models, inputs = ipa_models
    workflow = _advanced()
    workflow["34"] = {"class_type": "LoadImageMask", "inputs": {"image": "face.png", "channel": "red"}}
    workflow["32"]["inputs"]["attn_mask"] = ["34", 0]
    assert_parity(workflow, ipa_build[backend]("masked", workflow), tmp_path, models, inputs)


def test_faceid_files_are_refused():
    with pytest.raises(Exception, match="FaceID"):
        read_ipadapter({"ip_adapter.0.to_q_lora.down.weight": torch.zeros(1), "image_proj.proj.weight": torch.zeros(1)},
                       True, "ip-adapter-faceid_sd15.safetensors")


def test_the_readme_example_workflow_runs(ipa_models, tmp_path):
    """kiln/examples/ipadapter.json (the README's example) with the test's files and a small size."""
    import json
    from pathlib import Path

    import kiln

    models, inputs = ipa_models
    workflow = json.loads((Path(kiln.__file__).parent / "examples" / "ipadapter.json").read_text())
    workflow["4"]["inputs"]["ckpt_name"] = "tiny-sd15.safetensors"
    workflow["12"]["inputs"]["image"] = "face.png"
    workflow["5"]["inputs"].update(width=64, height=64)
    workflow["3"]["inputs"]["steps"] = 3
    with_adapter = render(workflow, models, inputs, tmp_path / "a")
    workflow["3"]["inputs"]["model"] = ["4", 0]
    assert not np.array_equal(with_adapter, render(workflow, models, inputs, tmp_path / "b"))
