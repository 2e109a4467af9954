"""The interpreter end to end on tiny random-weight checkpoints in the real single-file layouts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.api import run_workflow
from kiln.compiler.interpreter import run_graph
from kiln.compiler.validate import validate
from kiln.compiler.workflow import parse_workflow
from kiln.nodes.folders import ModelFolders
from kiln.nodes.registry import RunContext
from workflows import hires_fix, img2img, inpaint, txt2img, variant


def run(workflow, models_dir, tmp_path, input_dir=None):
    result = run_workflow(workflow, models=models_dir, input_dir=input_dir, output_dir=tmp_path)
    return [np.asarray(Image.open(p)) for p in result.saved], result


def test_txt2img_writes_comfyui_named_png_with_prompt_chunk(models_dir, tmp_path):
    wf = txt2img(width=72, height=64, batch=2)
    images, result = run(wf, models_dir, tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in result.saved] == ["t2i_00001_.png", "t2i_00002_.png"]
    assert images[0].shape == (64, 72, 3) and images[0].dtype == np.uint8
    assert json.loads(Image.open(result.saved[0]).text["prompt"]) == wf
    assert images[0].std() > 1   # not a flat image
    assert not np.array_equal(images[0], images[1])   # two batch items, two noise draws


def test_same_seed_same_image_other_seed_other_image(models_dir, tmp_path):
    first, _ = run(txt2img(seed=5), models_dir, tmp_path / "a")
    again, _ = run(txt2img(seed=5), models_dir, tmp_path / "b")
    other, _ = run(txt2img(seed=6), models_dir, tmp_path / "c")
    assert np.array_equal(first[0], again[0]) and not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("sampler,scheduler", [("dpmpp_2m_sde", "karras"), ("uni_pc", "sgm_uniform"),
                                               ("dpm_adaptive", "exponential"), ("lcm", "simple")])
def test_samplers_run_through_the_unet(models_dir, tmp_path, sampler, scheduler):
    images, _ = run(txt2img(sampler=sampler, scheduler=scheduler, cfg=1.0), models_dir, tmp_path)
    assert images[0].shape == (64, 64, 3)


def test_img2img(models_dir, input_dir, tmp_path):
    images, _ = run(img2img(), models_dir, tmp_path, input_dir)
    assert images[0].shape == (72, 80, 3)   # VAEEncode keeps 72x80 (already multiples of 8)


def test_inpainting_keeps_the_unmasked_latent(models_dir, input_dir, tmp_path):
    wf = inpaint()
    folders = ModelFolders.from_models_dir(models_dir)
    graph = validate(parse_workflow(wf), folders, input_dir)
    ctx = RunContext(models=folders, input_dir=str(input_dir), output_dir=str(tmp_path), prompt=wf)
    out = run_graph(graph, ctx, keep={"3", "11"}).outputs
    encoded, sampled = out["11"][0], out["3"][0]
    mask = torch.nn.functional.interpolate(encoded["noise_mask"].reshape(1, 1, 72, 80),
                                           size=encoded["samples"].shape[-2:], mode="bilinear")
    keep = mask[0, 0] == 0   # latent pixels the sampler must leave exactly as encoded
    assert keep.any() and (~keep).any()
    assert torch.allclose(sampled["samples"][..., keep], encoded["samples"][..., keep], atol=1e-5)
    assert not torch.allclose(sampled["samples"][..., ~keep], encoded["samples"][..., ~keep])


def test_a_model_no_later_node_reads_is_freed(models_dir, tmp_path, monkeypatch):
    """The checkpoint's CLIP is gone once the prompts are encoded (the interpreter drops an output
    slot after its last reader, and the run's model cache keeps nothing alive); its UNet and VAE
    stay until their own last readers."""
    import gc
    import weakref

    import kiln.nodes.models.checkpoint as checkpoint
    from kiln.compiler.interpreter import RunEvents

    real, refs, alive = checkpoint.load_checkpoint, {}, {}

    def load(*args, **kwargs):
        out = real(*args, **kwargs)
        refs.update(zip(("model", "clip", "vae"), map(weakref.ref, out)))
        return out

    class Watch(RunEvents):
        def executing(self, node_id):
            if node_id == "3":   # the KSampler, after both CLIPTextEncodes
                gc.collect()
                alive.update({name: ref() is not None for name, ref in refs.items()})

    monkeypatch.setattr(checkpoint, "load_checkpoint", load)
    folders = ModelFolders.from_models_dir(models_dir)
    run_graph(validate(parse_workflow(txt2img()), folders, None),
              RunContext(models=folders, output_dir=str(tmp_path)), events=Watch())
    assert alive == {"model": True, "clip": False, "vae": True}


def test_hires_fix(models_dir, tmp_path):
    wf = variant(hires_fix(), "5", width=64, height=64)
    images, result = run(wf, models_dir, tmp_path)
    assert images[0].shape == (128, 128, 3)    # x4 ESRGAN then x0.5
    assert [t.class_type for t in result.timings].count("KSampler") == 2


def test_sdxl_txt2img(models_dir, tmp_path):
    images, _ = run(txt2img("tiny-sdxl.safetensors", width=64, height=64), models_dir, tmp_path)
    assert images[0].shape == (64, 64, 3) and images[0].std() > 1


def test_sd2_v_prediction_txt2img(models_dir, tmp_path):
    images, _ = run(txt2img("tiny-sd2-v.safetensors"), models_dir, tmp_path)
    assert images[0].shape == (64, 64, 3)
