"""AOTInductor plans against the interpreter on the tiny fixtures (CPU, fp32).

Plans are compiled once per session into a session cache (Settings.cache_dir), so stages that
only differ in size (txt2img's and HiRes fix's denoiser and final decode) compile once.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kiln.kernels.errors import KilnError
from kiln.runtime.errors import PlanError
from kiln.runtime.executor import run_plan
from kiln.runtime.plan import load_plan
from plan_parity import assert_parity, check_runtime_prompt, compiled_files, plan_compiler
from workflows import PLAN_VARIANTS, hires_fix, img2img, txt2img, variant


@pytest.fixture(scope="session")
def kiln_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kiln-cache")


@pytest.fixture(scope="session")
def compile_plan(kiln_cache, models_dir, input_dir, tmp_path_factory):
    return plan_compiler(tmp_path_factory.mktemp("plans"), models_dir, input_dir, "aoti", kiln_cache)


@pytest.fixture(scope="session")
def t2i_plan(compile_plan):
    return compile_plan("t2i", txt2img(), ["5.width=64..96", "5.height=48..80", "5.batch_size=1..2"])


@pytest.fixture(scope="session")
def hires_compile(compile_plan, t2i_plan, kiln_cache):
    """(plan, artifacts it added to the cache): after t2i, only the fused HiRes chain is new."""
    before = compiled_files(kiln_cache)
    plan = compile_plan("hires", hires_fix())
    return plan, compiled_files(kiln_cache) - before


@pytest.fixture(scope="session")
def hires_plan(hires_compile):
    return hires_compile[0]


# --- the denoiser module, eagerly (no compile) ---------------------------------------------
@pytest.mark.parametrize("ckpt,cfg,mask", [
    ("tiny-sd15.safetensors", 7.0, False), ("tiny-sd15.safetensors", 1.0, False),
    ("tiny-sd2-v.safetensors", 5.5, False), ("tiny-sdxl.safetensors", 6.0, False),
    ("tiny-sd15-inpainting.safetensors", 7.0, True), ("tiny-sd15-inpainting.safetensors", 4.0, False)])
def test_denoiser_module_equals_guider(models_dir, ckpt, cfg, mask):
    from kiln.compiler.lower.denoiser import build_denoiser
    from kiln.kernels.inpaint import concat_cond
    from kiln.nodes.guider import Guider
    from kiln.nodes.models.checkpoint import load_checkpoint

    model, clip, _ = load_checkpoint(models_dir / "checkpoints" / ckpt)
    (cond, cond_pooled), (uncond, uncond_pooled) = (clip.encode(t, return_pooled=True) for t in ("a red fox", "blurry"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 11, generator=gen)   # odd sizes on purpose
    latent = torch.randn(2, 4, 9, 11, generator=gen)
    denoise_mask = (torch.rand(2, 4, 9, 11, generator=gen) > 0.5).float() if mask else None
    sigma = torch.tensor([3.7, 3.7])
    guider = Guider(model, [[cond, {"pooled_output": cond_pooled}]], [[uncond, {"pooled_output": uncond_pooled}]],
                    cfg).prepare(x, latent, denoise_mask)
    sizes = {"width": 88, "height": 72, "crop_w": 0, "crop_h": 0, "target_width": 88, "target_height": 72}
    extra = [model.encode_adm(p, **sizes) for p in (cond_pooled, uncond_pooled)] if model.arch == "sdxl" else []
    if model.in_channels != 4:
        extra.append(concat_cond(x, latent, denoise_mask))
    with torch.inference_mode():
        expected = guider(x, sigma)
        denoised, uncond_denoised = build_denoiser(model, cfg)(x, sigma, cond, uncond, torch.tensor(cfg), *extra)
    assert torch.equal(denoised, expected)
    if cfg == 1.0:
        assert not uncond_denoised.any()


def test_denoiser_refuses_areas(models_dir):
    from kiln.compiler.lower.denoiser import build_denoiser
    from kiln.nodes.models.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors")
    with pytest.raises(KilnError, match="full-area conditioning only.*area"):
        build_denoiser(model, 7.0, positive=[{"area": (8, 8, 0, 0), "strength": 1.0}], negative=[{}])


# --- plans against the interpreter ---------------------------------------------------------
def test_txt2img_plan_matches_interpreter(t2i_plan, tmp_path, models_dir, input_dir):
    assert_parity(txt2img(), t2i_plan, tmp_path, models_dir, input_dir)


def test_img2img_plan_matches_interpreter(compile_plan, t2i_plan, kiln_cache, tmp_path, models_dir, input_dir):
    workflow = img2img()
    before = compiled_files(kiln_cache)
    plan = compile_plan("i2i", workflow)
    assert compiled_files(kiln_cache) == before   # denoiser and decode: txt2img's, other sizes
    assert_parity(workflow, plan, tmp_path, models_dir, input_dir)


def test_img2img_plan_with_a_runtime_image_takes_other_sizes(compile_plan, tmp_path, models_dir, input_dir):
    """``--input 10.image``: the encode and the denoiser follow the image's size, so the
    load_image stage takes any height and width; images of other sizes match the interpreter."""
    from PIL import Image

    workflow = img2img()
    plan = load_plan(compile_plan("i2i-runtime", workflow, inputs=("10.image",)))
    load = plan.manifest.stages[0]
    assert load.kind == "load_image" and load.params["shapes"] == {"image": [1, None, None, 3]}
    Image.open(input_dir / "input.png").resize((56, 48)).save(input_dir / "smaller.png")
    assert_parity(workflow, plan, tmp_path / "default", models_dir, input_dir)
    other = variant(workflow, "10", image="smaller.png")
    assert_parity(other, plan, tmp_path / "smaller", models_dir, input_dir, values={"10.image": "smaller.png"})


def test_hires_fix_plan_matches_interpreter(hires_plan, tmp_path, models_dir, input_dir):
    assert_parity(hires_fix(), hires_plan, tmp_path, models_dir, input_dir)


# AOTInductor builds each variant for minutes on 2 cores: the default suite checks them on ONNX
# (test_onnx_plan), CI (--runslow) here too; the cheap one stays in the default suite.
@pytest.mark.parametrize("name", [n if n in ("inpaint-model-no-mask",) else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PLAN_VARIANTS])
def test_variant_matches_interpreter(compile_plan, name, tmp_path, models_dir, input_dir):
    workflow = PLAN_VARIANTS[name]()
    assert_parity(workflow, compile_plan(name, workflow), tmp_path, models_dir, input_dir)


@pytest.mark.slow
def test_bf16_plan_matches_the_bf16_interpreter(compile_plan, tmp_path, models_dir, input_dir):
    plan = compile_plan("t2i-bf16", txt2img(), dtype="bf16")
    assert load_plan(plan).manifest.target["dtype"] == "bf16"
    assert_parity(txt2img(), plan, tmp_path, models_dir, input_dir, dtype="bf16")


def test_hires_fix_fuses_and_shares(hires_compile):
    plan, compiled = hires_compile
    assert len(compiled) == 1
    manifest = load_plan(plan).manifest
    assert [s.name for s in manifest.stages] == ["sample_3", "module_8-11-12-13", "sample_14", "module_15-9",
                                                 "save_9"]
    first, second = (s for s in manifest.stages if s.kind == "sample")
    # One UNet in the weights file, named the same way by both samplers' constant maps.
    assert first.constant_names == second.constant_names
    assert manifest.members[first.artifact] == manifest.members[second.artifact]


def test_declared_sizes_and_seed_run_without_recompiling(t2i_plan, kiln_cache, tmp_path, models_dir, input_dir):
    before = compiled_files(kiln_cache)
    values = {"5.width": 96, "5.height": 48, "5.batch_size": 2, "3.seed": 11}
    assert_parity(txt2img(), t2i_plan, tmp_path, models_dir, input_dir, values)
    assert compiled_files(kiln_cache) == before
    with pytest.raises(PlanError, match="outside the range.*64..96"):
        run_plan(load_plan(t2i_plan), {"5.width": 104}, output_dir=tmp_path / "refused")


def test_same_architecture_reuses_compiled_stages(compile_plan, t2i_plan, kiln_cache, tmp_path, models_dir,
                                                  input_dir):
    """Weights are not compiled in: another checkpoint of the same shapes hits the cache."""
    from kiln.nodes.models.synthetic import write_checkpoint

    write_checkpoint(models_dir / "checkpoints" / "tiny-sd15-other.safetensors", "sd1", size="tiny", seed=5)
    before = compiled_files(kiln_cache)
    workflow = txt2img("tiny-sd15-other.safetensors")
    plan = compile_plan("other", workflow, ["5.width=64..96", "5.height=48..80", "5.batch_size=1..2"])
    assert compiled_files(kiln_cache) == before
    assert_parity(workflow, plan, tmp_path, models_dir, input_dir)


def test_inspect_shows_folding(hires_plan):
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "inspect", str(hires_plan)], capture_output=True,
                         text=True, check=True).stdout
    assert "6 CLIPTextEncode -> const.6.0.0.cond" in out
    assert "5 EmptyLatentImage -> const.5.0.samples" in out
    assert "tiny-sd15.safetensors (CLIP)" in out


# --- refusals at compile time ----------------------------------------------------------------
def test_tiled_upscale_needs_a_constant_size(compile_plan):
    with pytest.raises(KilnError, match=r"(?s)node 11 \(ImageUpscaleWithModel.*in tiles, which needs concrete "
                                        r"sizes.*sizes are runtime inputs \(5\.width=64\.\.576\)"):
        compile_plan("tiled-range", hires_fix(), ["5.width=64..576"])


def test_lanczos_needs_a_constant_size(compile_plan):
    workflow = variant(hires_fix(), "12", upscale_method="lanczos")
    with pytest.raises(KilnError, match=r"(?s)node 12 \(ImageScaleBy.*lanczos filter's weights depend on the sizes"):
        compile_plan("lanczos-range", workflow, ["5.width=64..128"])


# --- a runtime prompt ---------------------------------------------------------------------
@pytest.mark.slow   # the ONNX one runs by default (test_onnx_plan)
def test_runtime_prompt(compile_plan, tmp_path, models_dir, input_dir):
    check_runtime_prompt(txt2img(), compile_plan("text", txt2img(), ["6.text"]), tmp_path, models_dir, input_dir)
