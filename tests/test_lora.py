"""LoraLoader / LoraLoaderModelOnly: every layout ComfyUI reads, checked against checkpoints
merged by formula in the tests (lora_files), weight by weight and image by image."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.api import run_workflow
from kiln.kernels.errors import KilnError
from kiln.nodes.models.checkpoint import load_checkpoint
from kiln.nodes.models.detect import detect_model
from kiln.nodes.models.lora import load_lora_for_models
from kiln.nodes.models.synthetic import write_checkpoint
from kiln.nodes.models.unet import diffusers_config
from lora_files import (CLIP_KINDS, SD1_CLIP, UNET, add_into, factors, kohya_everything, lora_delta, openclip_slice,
                        read, save, unet_diffusers_names, whole_unet_lora, with_loras)
from workflows import txt2img

def _same_weights(a, b) -> None:
    (model_a, clip_a), (model_b, clip_b) = a, b
    sa, sb = model_a.unet.state_dict(), model_b.unet.state_dict()
    assert sa.keys() == sb.keys()
    differing = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differing, differing[:5]
    if clip_a is not None:
        for key, encoder in clip_a.encoders.items():
            ea, eb = encoder.state_dict(), clip_b.encoders[key].state_dict()
            differing = [k for k in ea if not torch.equal(ea[k], eb[k])]
            assert not differing, differing[:5]


def _loaded(path):
    model, clip, _ = load_checkpoint(path)
    return model, clip


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("lora") / "sd1.safetensors", "sd1", seed=11)


def test_kohya_ldm_names_patch_every_weight_as_the_merged_checkpoint(sd1, tmp_path):
    base = read(sd1)
    lora, merged = kohya_everything(base, 0.8, 0.6, torch.Generator().manual_seed(0))
    model, clip = _loaded(sd1)
    patched = load_lora_for_models(lora, model, clip, 0.8, 0.6)
    _same_weights(patched, _loaded(save(merged, tmp_path / "merged.safetensors")))
    _same_weights((model, clip), _loaded(sd1))    # the loader's inputs are left as they were


def test_diffusers_names_and_attention_processors(sd1, tmp_path):
    base = read(sd1)
    names = unet_diffusers_names(base, diffusers_config(detect_model(base)))
    generator = torch.Generator().manual_seed(1)
    lora, merged = {}, dict(base)
    for i, (ldm, diffusers) in enumerate(sorted(names.items())):
        weight = base[UNET + ldm]
        if not diffusers.endswith(".weight") or weight.dim() == 1:
            continue
        stem = diffusers[:-len(".weight")]
        if ".attn" in stem and i % 2:   # the old diffusers attention-processor names
            proc = "unet." + stem.replace(".to_", ".processor.to_").removesuffix(".0")
            up_name, down_name = proc + "_lora.up.weight", proc + "_lora.down.weight"
        else:
            up_name = "lora_unet_" + stem.replace(".", "_") + ".lora_up.weight"
            down_name = up_name.replace(".lora_up.", ".lora_down.")
        up, down = factors(weight.shape, 2, generator)
        lora.update({up_name: up, down_name: down})
        add_into(merged, UNET + ldm, None, lora_delta(up, down, weight.shape, None, 1.0))
    model, clip = _loaded(sd1)
    _same_weights(load_lora_for_models(lora, model, clip, 1.0, 1.0), _loaded(save(merged, tmp_path / "m.safetensors")))


def test_peft_attention_names_are_skipped_as_comfyui_skips_them(sd1, caplog):
    base = read(sd1)
    model, clip = _loaded(sd1)
    g = torch.Generator().manual_seed(2)
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    proj = "unet.down_blocks.0.attentions.0.proj_in"
    q_up, q_down = factors(base[UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"].shape, 2, g)
    p_up, p_down = factors(base[UNET + "input_blocks.1.1.proj_in.weight"].shape, 2, g)
    lora = {attn + ".lora_A.weight": q_down, attn + ".lora_B.weight": q_up,
            proj + ".lora_A.weight": p_down, proj + ".lora_B.weight": p_up}
    with caplog.at_level(logging.WARNING):
        patched, _ = load_lora_for_models(lora, model, None, 1.0, 0.0)
    assert f"lora key not loaded: {attn}.lora_A.weight" in caplog.text
    assert "proj_in" not in caplog.text
    ldm_proj = patched.unet.down_blocks[0].attentions[0].proj_in.weight
    expected = base[UNET + "input_blocks.1.1.proj_in.weight"].float() + lora_delta(p_up, p_down, ldm_proj.shape,
                                                                                    None, 1.0)
    assert torch.equal(ldm_proj, expected)
    assert torch.equal(patched.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight,
                       model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight)


CONV = "input_blocks.1.0.in_layers.2.weight"      # a 3x3 resnet conv (LoCon)
LINEAR = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _lycoris_cases(base, g):
    conv, linear = base[UNET + CONV].float(), base[UNET + LINEAR].float()
    out_c, in_c, kh, kw = conv.shape
    r = 3
    up, mid, down = torch.randn(out_c, r, 1, 1, generator=g), torch.randn(r, r, kh, kw, generator=g), \
        torch.randn(r, in_c, 1, 1, generator=g)
    tucker = torch.einsum("or,rskl,si->oikl", up.flatten(1), mid, down.flatten(1))
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((linear.shape[0], r), (r, linear.shape[1]),
                                                                  (linear.shape[0], r), (r, linear.shape[1])))
    t1, t2 = torch.randn(r, r, kh, kw, generator=g), torch.randn(r, r, kh, kw, generator=g)
    ta1, tb1, ta2, tb2 = (torch.randn(s, generator=g) for s in ((r, out_c), (r, in_c), (r, out_c), (r, in_c)))
    loha_tucker = torch.einsum("ip,ijkl,jr->prkl", ta1, t1, tb1) * torch.einsum("ip,ijkl,jr->prkl", ta2, t2, tb2)
    k1 = torch.randn(4, 2, generator=g)
    k2a, k2b = torch.randn(linear.shape[0] // 4, 2, generator=g), torch.randn(2, linear.shape[1] // 2, generator=g)
    dora_scale = torch.rand(linear.shape[0], 1, generator=g) + 0.5
    lin_up, lin_down = factors(linear.shape, 2, g, scale=0.3)
    return {
        "locon_tucker": (CONV, {".lora_up.weight": up, ".lora_mid.weight": mid, ".lora_down.weight": down,
                                ".alpha": torch.tensor(1.5)}, conv + 0.7 * (1.5 / r) * tucker),
        "loha": (LINEAR, {".hada_w1_a": w1a, ".hada_w1_b": w1b, ".hada_w2_a": w2a, ".hada_w2_b": w2b,
                          ".alpha": torch.tensor(2.0)}, linear + 0.7 * (2.0 / r) * ((w1a @ w1b) * (w2a @ w2b))),
        "loha_tucker": (CONV, {".hada_w1_a": ta1, ".hada_w1_b": tb1, ".hada_w2_a": ta2, ".hada_w2_b": tb2,
                               ".hada_t1": t1, ".hada_t2": t2}, conv + 0.7 * loha_tucker),
        "lokr": (LINEAR, {".lokr_w1": k1, ".lokr_w2_a": k2a, ".lokr_w2_b": k2b, ".alpha": torch.tensor(4.0)},
                 linear + 0.7 * (4.0 / 2) * torch.kron(k1, k2a @ k2b)),
        "lokr_full": (LINEAR, {".lokr_w1": k1, ".lokr_w2": k2a @ k2b, ".alpha": torch.tensor(4.0)},
                      linear + 0.7 * torch.kron(k1, k2a @ k2b)),   # nothing factored: alpha is not applied
        "dora": (LINEAR, {".lora_up.weight": lin_up, ".lora_down.weight": lin_down, ".dora_scale": dora_scale},
                 None),
    }


@pytest.mark.parametrize("case", ["locon_tucker", "loha", "loha_tucker", "lokr", "lokr_full", "dora"])
def test_lycoris_and_dora_formulas(sd1, case):
    base = read(sd1)
    key, tensors, expected = _lycoris_cases(base, torch.Generator().manual_seed(3))[case]
    name = "lora_unet_" + key.rsplit(".", 1)[0].replace(".", "_")
    model, _ = _loaded(sd1)
    patched, _ = load_lora_for_models({name + s: t for s, t in tensors.items()}, model, None, 0.7, 0.0)
    weight = dict(patched.unet.named_parameters())[model.weights.targets["diffusion_model." + key]]
    if case == "dora":   # renormalised per output row of the original weight, then blended by strength
        original = base[UNET + key].float()
        up, down = tensors[".lora_up.weight"], tensors[".lora_down.weight"]
        calc = original + lora_delta(up, down, original.shape, None, 1.0)
        calc = calc * (tensors[".dora_scale"] / (original.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps))
        expected = original + 0.7 * (calc - original)
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-5)


def test_chained_loaders_round_the_clip_weights_once(sd1, tmp_path, models_dir):
    base = read(sd1)
    g = torch.Generator().manual_seed(4)
    key = SD1_CLIP + "0.self_attn.q_proj.weight"
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    files = []
    for i in range(2):
        up, down = factors(base[key].shape, 2, g, scale=0.02)
        files.append({name + ".lora_up.weight": up, name + ".lora_down.weight": down})
    model, clip = _loaded(sd1)
    once = load_lora_for_models(files[0], model, clip, 1.0, 0.9)
    twice = load_lora_for_models(files[1], *once, 1.0, -0.4)
    weight = twice[1].encoders["l"].model.text_model.encoder.layers[0].self_attn.q_proj.weight
    exact = base[key].float() + lora_delta(files[0][name + ".lora_up.weight"], files[0][name + ".lora_down.weight"],
                                           base[key].shape, None, 0.9)
    exact = exact + lora_delta(files[1][name + ".lora_up.weight"], files[1][name + ".lora_down.weight"],
                               base[key].shape, None, -0.4)
    assert torch.equal(weight, exact.half().float())   # fp32 sum of both, one fp16 rounding (ComfyUI's order)


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_openclip_text_encoders_and_sdxl_names(arch, tmp_path):
    path = write_checkpoint(tmp_path / f"{arch}.safetensors", arch, seed=5)
    base = read(path)
    g = torch.Generator().manual_seed(5)
    towers = {"sd2": [("lora_te_", "cond_stage_model.model.")],
              "sdxl": [("lora_te1_", "conditioner.embedders.0.transformer.text_model.encoder.layers."),
                       ("lora_te2_", "conditioner.embedders.1.model.")]}[arch]
    lora, merged = {}, dict(base)
    for prefix, where in towers:
        for kind, kohya in CLIP_KINDS.items():
            if where.endswith("layers."):      # CLIP-L, transformers layout
                key, rows = f"{where}1.{kind}.weight", None
                shape = base[key].shape
            else:                              # OpenCLIP, q/k/v fused in in_proj
                width = base[where + "ln_final.weight"].shape[0]
                key, rows = openclip_slice(f"1.{kind}", width)
                key = where + key
                shape = base[key][rows].shape if rows is not None else base[key].shape
            up, down = factors(shape, 2, g)
            name = f"{prefix}text_model_encoder_layers_1_{kohya}"
            lora.update({name + ".lora_up.weight": up, name + ".lora_down.weight": down})
            add_into(merged, key, rows, lora_delta(up, down, shape, None, 0.5))
    ldm = next(k for k in base if k.startswith(UNET) and "attn2.to_v.weight" in k)
    up, down = factors(base[ldm].shape, 2, g)
    name = "lora_unet_" + ldm[len(UNET):-len(".weight")].replace(".", "_")
    lora.update({name + ".lora_up.weight": up, name + ".lora_down.weight": down})
    add_into(merged, ldm, None, lora_delta(up, down, base[ldm].shape, None, 1.25))
    model, clip = _loaded(path)
    _same_weights(load_lora_for_models(lora, model, clip, 1.25, 0.5), _loaded(save(merged, tmp_path / "m.safetensors")))


@pytest.fixture
def lora_models(models_dir, tmp_path, sd1):
    """A models folder whose checkpoint is ``sd1``, with a LoRA for it and its merged checkpoint."""
    from kiln.demo import write_demo_models

    root = tmp_path / "models"
    write_demo_models(root)
    (root / "checkpoints" / "base.safetensors").write_bytes(sd1.read_bytes())
    lora, merged = kohya_everything(read(sd1), 0.8, 0.6, torch.Generator().manual_seed(6))
    save(lora, root / "loras" / "style.safetensors")
    save(merged, root / "checkpoints" / "merged.safetensors")
    return root


def _image(workflow, models, out):
    result = run_workflow(workflow, models=models, output_dir=out)
    return np.asarray(Image.open(result.saved[0]))


def test_lora_workflow_renders_the_merged_checkpoints_image(lora_models, tmp_path):
    with_lora = _image(with_loras(txt2img("base.safetensors"), ("style.safetensors", 0.8, 0.6)), lora_models,
                       tmp_path / "a")
    merged = _image(txt2img("merged.safetensors"), lora_models, tmp_path / "b")
    plain = _image(txt2img("base.safetensors"), lora_models, tmp_path / "c")
    assert np.array_equal(with_lora, merged) and not np.array_equal(with_lora, plain)
    off = _image(with_loras(txt2img("base.safetensors"), ("style.safetensors", 0.0, 0.0)), lora_models,
                 tmp_path / "d")
    assert np.array_equal(off, plain)   # both strengths 0: the inputs pass through


def test_model_only_loader_leaves_the_clip(lora_models, tmp_path):
    workflow = txt2img("base.safetensors")
    workflow["30"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["4", 0], "lora_name": "style.safetensors", "strength_model": 0.8}}
    workflow["3"]["inputs"]["model"] = ["30", 0]
    image = _image(workflow, lora_models, tmp_path / "a")
    assert not np.array_equal(image, _image(txt2img("base.safetensors"), lora_models, tmp_path / "b"))


def _problem(workflow, models, tmp_path):
    with pytest.raises(KilnError) as failure:
        run_workflow(workflow, models=models, output_dir=tmp_path)
    (problem,) = failure.value.problems
    return problem


def test_a_lora_for_another_model_is_refused_naming_the_node(lora_models, tmp_path):
    sdxl = write_checkpoint(tmp_path / "sdxl.safetensors", "sdxl", seed=7)
    save(whole_unet_lora(read(sdxl), torch.Generator().manual_seed(0)), lora_models / "loras" / "xl.safetensors")
    problem = _problem(with_loras(txt2img("base.safetensors"), ("xl.safetensors", 1.0, 1.0)), lora_models, tmp_path)
    assert (problem.node_id, problem.class_type, problem.input_name) == ("30", "LoraLoader", "lora_name")
    assert "made for another model" in problem.message and "xl.safetensors" in problem.message
    assert not list(tmp_path.glob("*.png"))


def test_a_file_that_is_no_lora_is_refused(lora_models, tmp_path):
    (lora_models / "loras" / "ckpt.safetensors").write_bytes((lora_models / "checkpoints" / "base.safetensors")
                                                              .read_bytes())
    problem = _problem(with_loras(txt2img("base.safetensors"), ("ckpt.safetensors", 1.0, 1.0)), lora_models, tmp_path)
    assert problem.input_name == "lora_name" and "none of its" in problem.message
    save({"x.oft_blocks": torch.zeros(2, 2, 2)}, lora_models / "loras" / "oft.safetensors")
    problem = _problem(with_loras(txt2img("base.safetensors"), ("oft.safetensors", 1.0, 1.0)), lora_models, tmp_path)
    assert "OFT" in problem.message


def test_a_missing_lora_names_the_folders_searched(lora_models, tmp_path):
    problem = _problem(with_loras(txt2img("base.safetensors"), ("nope.safetensors", 1.0, 1.0)), lora_models, tmp_path)
    assert problem.node_id == "30" and problem.input_name == "lora_name"
    assert "style.safetensors" in problem.format()   # what the folder does hold
