"""API-format workflows the tests run (built as dicts so each test can tweak one input)."""
from __future__ import annotations

import copy
import json
from importlib import resources


def txt2img(ckpt: str = "tiny-sd15.safetensors", *, width: int = 64, height: int = 64, steps: int = 4,
            sampler: str = "euler", scheduler: str = "normal", cfg: float = 7.0, seed: int = 3,
            batch: int = 1, prefix: str = "t2i") -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]},
              "_meta": {"title": "Positive"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height,
                                                           "batch_size": batch}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}, "_meta": {"title": "My Sampler"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def img2img(ckpt: str = "tiny-sd15.safetensors", image: str = "input.png", *, denoise: float = 0.6,
            steps: int = 4, sampler: str = "euler_ancestral", scheduler: str = "karras") -> dict:
    wf = txt2img(ckpt, steps=steps, sampler=sampler, scheduler=scheduler, prefix="i2i")
    del wf["5"]
    wf["10"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    wf["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    wf["3"]["inputs"].update(latent_image=["11", 0], denoise=denoise)
    return wf


def inpaint(ckpt: str = "tiny-sd15-inpainting.safetensors", image: str = "rgba.png") -> dict:
    wf = txt2img(ckpt, prefix="inpaint")
    del wf["5"]
    wf["10"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    wf["11"] = {"class_type": "VAEEncodeForInpaint", "inputs": {
        "pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 6}}
    wf["3"]["inputs"]["latent_image"] = ["11", 0]
    return wf


def hires_fix() -> dict:
    """The workflow `kiln demo` runs (tiny SD1.5 checkpoint + tiny ESRGAN x4)."""
    text = resources.files("kiln.examples").joinpath("hires_fix.json").read_text()
    return json.loads(text)


def variant(workflow: dict, node_id: str, **inputs) -> dict:
    wf = copy.deepcopy(workflow)
    wf[node_id]["inputs"].update(inputs)
    return wf


def hires_fix_tiled() -> dict:
    """HiRes fix whose upscale input (576x64) is wider than one 512 px tile: ComfyUI tiles it."""
    workflow = variant(hires_fix(), "5", width=576, height=64)
    return variant(variant(workflow, "3", steps=3), "14", steps=2)


def latent_hires(upscale_method: str = "bislerp") -> dict:
    """HiRes fix in latent space: the first sampler's latent resized by LatentUpscaleBy, sampled again."""
    workflow = hires_fix()
    for node_id in ("8", "10", "11", "12", "13"):
        del workflow[node_id]
    workflow["16"] = {"class_type": "LatentUpscaleBy",
                      "inputs": {"samples": ["3", 0], "upscale_method": upscale_method, "scale_by": 1.5}}
    workflow["14"]["inputs"]["latent_image"] = ["16", 0]
    return workflow


def clip_skip(workflow: dict, layer: int = -2) -> dict:
    """Both prompts through CLIPSetLastLayer (ComfyUI's "clip skip")."""
    workflow = copy.deepcopy(workflow)
    workflow["20"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": layer}}
    for node_id in ("6", "7"):
        workflow[node_id]["inputs"]["clip"] = ["20", 0]
    return workflow


def area_composition() -> dict:
    """A second prompt on an area of the image (feathered edges, strength 0.8), combined with the
    full-image prompt: two positive entries."""
    workflow = txt2img(width=128, height=96)
    workflow["20"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue sky", "clip": ["4", 1]}}
    workflow["21"] = {"class_type": "ConditioningSetArea", "inputs": {
        "conditioning": ["20", 0], "width": 64, "height": 64, "x": 32, "y": 16, "strength": 0.8}}
    workflow["22"] = {"class_type": "ConditioningCombine",
                      "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["21", 0]}}
    workflow["3"]["inputs"]["positive"] = ["22", 0]
    return workflow


# Workflows that compile into other stages than txt2img / img2img / HiRes fix (plan parity tests
# of each backend).
PLAN_VARIANTS = {
    "tiled": hires_fix_tiled,
    "lanczos": lambda: variant(hires_fix(), "12", upscale_method="lanczos"),
    "latent-bislerp": latent_hires,
    "inpaint": inpaint,
    "inpaint-model-no-mask": lambda: txt2img("tiny-sd15-inpainting.safetensors"),
    "area-composition": area_composition,
}


def render(workflow: dict, models, inputs, out):
    """The first image the interpreter saves for ``workflow``, as an array."""
    import numpy as np
    from PIL import Image

    from kiln.api import run_workflow

    result = run_workflow(workflow, models=models, input_dir=inputs, output_dir=out)
    return np.asarray(Image.open(result.saved[0]))
