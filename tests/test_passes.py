"""Compiler passes on the graph and stage level (no lowering): DCE, CSE, runtime inputs,
constant folding, partition and fusion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.kernels.errors import KilnError
from kiln.compiler.graph import Link
from kiln.compiler.interpreter import run_graph
from kiln.compiler.passes import runtime_inputs
from kiln.compiler.pipeline import PASSES, run_passes
from kiln.nodes.image import IMAGE_TO_UINT8 as TO_UINT8
from kiln.compiler.stages import (Compilation, CompileOptions, EnvValue, StageInput, chain_members,
                                  flatten, unflatten)
from kiln.compiler.validate import validate
from kiln.compiler.workflow import parse_workflow
from kiln.nodes.folders import ModelFolders
from kiln.nodes import registry
from kiln.nodes.registry import RunContext
from workflows import hires_fix, img2img, txt2img, variant

NAMES = [p.__name__ for p in PASSES]


def passes_until(workflow: dict, last: str, models_dir, input_dir=None, inputs=()) -> Compilation:
    options = CompileOptions(models=ModelFolders.from_models_dir(models_dir),
                             input_dir=str(input_dir) if input_dir else None, inputs=tuple(inputs))
    return run_passes(Compilation(parse_workflow(workflow), options), PASSES[:NAMES.index(last) + 1])


def error_of(call) -> str:
    with pytest.raises(KilnError) as info:
        call()
    return str(info.value)


# --- dead_nodes -----------------------------------------------------------------------------
def test_dead_nodes_drops_what_no_output_reads(models_dir):
    wf = txt2img()
    wf["20"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "unused", "clip": ["4", 1]}}
    wf["21"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    c = passes_until(wf, "dead_nodes", models_dir)
    assert sorted(c.graph.nodes) == sorted(txt2img())
    assert c.graph.source == wf   # the PNG prompt chunk keeps the workflow as written


# --- merge_identical ------------------------------------------------------------------------
def test_two_loaders_of_one_file_and_identical_encodes_merge(models_dir):
    wf = variant(txt2img(), "7", text="a red fox")          # negative == positive
    wf["40"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}}
    wf["7"]["inputs"]["clip"] = ["40", 1]                   # ... read through a second loader
    c = passes_until(wf, "merge_identical", models_dir)
    assert sorted(c.graph.nodes, key=int) == ["3", "4", "5", "6", "8", "9"]
    assert c.graph.nodes["3"].inputs["negative"] == Link("6", 0)
    assert c.graph.nodes["6"].inputs["clip"] == Link("4", 1)


def test_seeded_output_and_runtime_input_nodes_never_merge(models_dir):
    wf = variant(txt2img(), "7", text="a red fox")
    wf["30"] = dict(wf["3"])                                 # an identical second sampler ...
    wf["31"] = {"class_type": "VAEDecode", "inputs": {"samples": ["30", 0], "vae": ["4", 2]}}
    wf["32"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "t2i", "images": ["31", 0]}}
    wf["33"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "t2i", "images": ["8", 0]}}
    c = passes_until(wf, "merge_identical", models_dir, inputs=["7.text"])
    assert {"3", "30", "9", "33", "6", "7"} <= set(c.graph.nodes)
    assert "31" in c.graph.nodes and "8" in c.graph.nodes   # they read different samplers


# --- runtime_inputs -------------------------------------------------------------------------
def test_seeds_are_inputs_by_default_and_declarations_take_workflow_defaults(models_dir):
    c = passes_until(txt2img(seed=11), "runtime_inputs", models_dir,
                     inputs=["3.steps", "5.width=64..256", "6.text", "3.sampler_name", "3.cfg=1..9.5"])
    got = {i.name: (i.type, i.default, i.min, i.max) for i in c.inputs}
    assert got == {"3.seed": ("INT", 11, 0, 2 ** 64 - 1), "3.steps": ("INT", 4, 1, 10000),
                   "3.cfg": ("FLOAT", 7.0, 1.0, 9.5), "3.sampler_name": ("COMBO", "euler", None, None),
                   "5.width": ("INT", 64, 64, 256), "6.text": ("STRING", "a red fox", None, None)}
    assert [i.name for i in c.inputs] == ["6.text", "5.width", "3.seed", "3.steps", "3.cfg", "3.sampler_name"]
    assert "dpmpp_2m" in next(i for i in c.inputs if i.name == "3.sampler_name").choices
    assert next(i for i in c.inputs if i.name == "6.text").env == "in.6.text"
    (seed,) = passes_until(txt2img(seed=11), "runtime_inputs", models_dir, inputs=["3.seed=0..100"]).inputs
    assert (seed.name, seed.min, seed.max) == ("3.seed", 0, 100)   # a declared seed range wins


@pytest.mark.parametrize("declaration,words", [
    ("6.text=1..2", ["node 6 (CLIPTextEncode", "input 'text'", "only INT and FLOAT inputs take a range"]),
    ("99.seed", ["node 99", "not in the workflow"]),
    ("3.sead", ["node 3 (KSampler", "has no input 'sead'", "did you mean 'seed'"]),
    ("3.model", ["input 'model'", "a MODEL socket carries another node's output"]),
    ("5.width=8..64", ["input 'width'", "inside the node's own limits", "within 16..16384"]),
    ("5.width=128..256", ["outside the range", "found 64"]),
    ("5.width=64.5..128", ["whole numbers"]),
    ("4.ckpt_name", ["file names are fixed"]),
    ("3seed", ["--input needs NODE.INPUT"]),
    ("5.width=64-128", ["--input needs NODE.INPUT"]),
])
def test_bad_declarations_are_refused_with_clear_messages(models_dir, declaration, words):
    message = error_of(lambda: passes_until(txt2img(), "runtime_inputs", models_dir, inputs=[declaration]))
    assert "'runtime_inputs' failed (passes run before it: validate, dead_nodes)" in message
    for word in words:
        assert word in message


def test_a_widget_fed_by_a_link_is_refused():
    wf = txt2img()
    wf["3"]["inputs"]["steps"] = ["5", 0]
    c = Compilation(parse_workflow(wf), CompileOptions(inputs=("3.steps",)))
    assert "declare that node's input instead" in error_of(lambda: runtime_inputs(c))


def test_an_input_of_a_dead_node_is_refused(models_dir):
    wf = txt2img()
    wf["21"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    message = error_of(lambda: passes_until(wf, "runtime_inputs", models_dir, inputs=["21.width"]))
    assert "no output node depends on it" in message


# --- fold_constants -------------------------------------------------------------------------
def test_txt2img_folds_prompts_and_empty_latent_and_drops_clip(models_dir):
    wf = txt2img()
    c = passes_until(wf, "fold_constants", models_dir)
    assert [(f["node_id"], f["class_type"]) for f in c.folded] == [
        ("6", "CLIPTextEncode"), ("7", "CLIPTextEncode"), ("5", "EmptyLatentImage")]
    assert c.runtime_nodes == ("3", "8", "9")
    assert c.dropped_models == ("tiny-sd15.safetensors (CLIP)",)
    assert sorted(c.handles) == ["4"]
    assert set(c.constants) == {"const.6.0.0.cond", "const.6.0.0.pooled_output", "const.7.0.0.cond",
                                "const.7.0.0.pooled_output", "const.5.0.samples"}
    # The constants are the interpreter's values.
    folders = ModelFolders.from_models_dir(models_dir)
    eager = run_graph(validate(parse_workflow(wf), folders), RunContext(models=folders), targets=["5", "6"]).outputs
    assert torch.equal(c.constants["const.6.0.0.cond"], eager["6"][0][0][0])
    assert torch.equal(c.constants["const.5.0.samples"], torch.zeros(1, 4, 8, 8))
    assert c.values[Link("6", 0)] == EnvValue("CONDITIONING", {"0.cond": "const.6.0.0.cond",
                                                               "0.pooled_output": "const.6.0.0.pooled_output"}, [{}])


def test_a_runtime_prompt_keeps_its_encoder_and_the_clip(models_dir):
    c = passes_until(txt2img(), "partition_stages", models_dir, inputs=["6.text"])
    assert [f["node_id"] for f in c.folded] == ["7", "5"]
    assert c.dropped_models == ()
    tokenize, encode, sample = c.stages[:3]
    assert (tokenize.name, tokenize.kind, tokenize.inputs) == ("tokenize_6", "tokenize", {"text": "in.6.text"})
    assert tokenize.outputs == {"tokens": "6.text.tokens"} and tokenize.params == {"pad_tokens": [49407]}
    assert (encode.name, encode.kind, encode.inputs) == ("module_6", "module", {"6.text": "6.text.tokens"})
    assert encode.outputs == {"6.0.0.cond": "6.0.0.cond"}   # SD1 reads no pooled output
    assert sample.inputs["cond_context"] == "6.0.0.cond"
    assert sample.inputs["uncond_context"] == "const.7.0.0.cond"


def test_a_runtime_prompt_pads_as_its_encoder(models_dir):
    """OpenCLIP (SD2) pads with 0, not EOS: the tokenize stage carries the encoder's pad token."""
    workflow = variant(txt2img(), "4", ckpt_name="tiny-sd2-v.safetensors")
    c = passes_until(workflow, "partition_stages", models_dir, inputs=["6.text"])
    assert c.stages[0].params == {"pad_tokens": [0]}


def test_an_sdxl_runtime_prompt_tokenizes_for_both_encoders(models_dir):
    """CLIP-L pads with EOS, CLIP-G with 0; the sampler reads the pooled output the text stage computes."""
    c = passes_until(txt2img("tiny-sdxl.safetensors"), "partition_stages", models_dir, inputs=["6.text"])
    tokenize, encode, sample = c.stages[:3]
    assert tokenize.params == {"pad_tokens": [0, 49407]} and list(c.handles["4"][1].encoders) == ["g", "l"]
    assert set(encode.outputs) == {"6.0.0.cond", "6.0.0.pooled_output"}
    assert sample.inputs["cond_pooled"] == "6.0.0.pooled_output"


def test_several_entries_make_a_guided_sample_stage(models_dir):
    """Area composition: the sampler reads every conditioning tensor by entry, the denoiser runs the
    guider's batching on them."""
    from workflows import area_composition

    c = passes_until(area_composition(), "build_modules", models_dir)
    sample = next(s for s in c.stages if s.kind == "sample")
    assert sample.params["guided"] is True and "cond_context" not in sample.inputs
    assert [n for n in sample.inputs if "." in n] == ["positive.0.cond", "positive.0.pooled_output",
                                                      "positive.1.cond", "positive.1.pooled_output",
                                                      "negative.0.cond", "negative.0.pooled_output"]
    assert sample.module.inputs[:3] == ("x", "sigma", "cfg")


def test_preview_image_is_a_preview_save_stage(models_dir):
    workflow = txt2img()
    workflow["30"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    stages = passes_until(workflow, "partition_stages", models_dir).stages
    save = next(s for s in stages if s.node_ids == ["30"] and s.kind == "save_image")
    assert save.params == {"preview": True, "node_id": "30"} and save.inputs == {"images": "30.0.value"}


def test_an_embedding_in_a_runtime_prompt_is_refused(models_dir):
    workflow = variant(txt2img(), "6", text="a embedding:style fox")
    with pytest.raises(KilnError, match=r"node 6 \(CLIPTextEncode.*'text'.*embeddings"):
        passes_until(workflow, "partition_stages", models_dir, inputs=["6.text"])


def test_img2img_folds_load_and_encode(models_dir, input_dir):
    c = passes_until(img2img(), "partition_stages", models_dir, input_dir)
    assert [f["class_type"] for f in c.folded] == ["CLIPTextEncode", "CLIPTextEncode", "LoadImage", "VAEEncode"]
    assert set(c.constants) == {"const.6.0.0.cond", "const.7.0.0.cond", "const.11.0.samples"}
    assert c.constants["const.11.0.samples"].shape == (1, 4, 9, 10)
    sample = c.stages[0]
    assert sample.inputs["latent"] == "const.11.0.samples"
    assert sample.params["denoise"] == 0.6 and sample.params["sampler_name"] == "euler_ancestral"


# --- partition + fuse -----------------------------------------------------------------------
def test_hires_fix_stages_and_environment_wiring(models_dir):
    c = passes_until(hires_fix(), "fuse_stages", models_dir)
    assert [(s.name, s.kind, s.node_ids) for s in c.stages] == [
        ("sample_3", "sample", ["3"]),
        ("module_8-11-12-13", "module", ["8", "11", "12", "13"]),
        ("sample_14", "sample", ["14"]),
        ("module_15-9", "module", ["15", "9"]),
        ("save_9", "save_image", ["9"]),
    ]
    s3, chain, s14, decode, save = c.stages
    assert s3.inputs == {"latent": "const.5.0.samples", "cond_context": "const.6.0.0.cond",
                         "uncond_context": "const.7.0.0.cond", "seed": "in.3.seed"}
    assert s3.outputs == {"samples": "3.0.samples"}
    assert s3.params == {"steps": 12, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                         "denoise": 1.0, "prediction": "eps", "scale_factor": 0.18215, "latent_channels": 4}
    assert (chain.inputs, chain.outputs) == ({"3.0.samples": "3.0.samples"}, {"13.0.samples": "13.0.samples"})
    assert [m.class_type for m in chain.members] == ["VAEDecode", "ImageUpscaleWithModel", "ImageScaleBy",
                                                      "VAEEncode"]
    assert s14.inputs == {"latent": "13.0.samples", "cond_context": "const.6.0.0.cond",
                          "uncond_context": "const.7.0.0.cond", "seed": "in.14.seed"}
    assert (s14.params["denoise"], s14.params["sampler_name"], s14.params["steps"]) == (0.5, "euler_ancestral", 8)
    assert (decode.inputs, decode.outputs) == ({"14.0.samples": "14.0.samples"}, {"9.0.value": "9.0.value"})
    assert [m.class_type for m in decode.members] == ["VAEDecode", TO_UINT8.class_type]
    assert (save.inputs, save.params) == ({"images": "9.0.value"}, {"filename_prefix": "hires", "node_id": "9"})
    assert sorted(c.constants) == ["const.5.0.samples", "const.6.0.0.cond", "const.7.0.0.cond"]
    assert [i.name for i in c.inputs] == ["3.seed", "14.seed"]
    program = c.program()
    assert program.target == {"device": "cpu", "dtype": "fp32", "backend": "aoti"}
    assert program.workflow == hires_fix() and program.dropped_models == ["tiny-sd15.safetensors (CLIP)"]


def test_chain_members_resolve_handles_links_and_positions(models_dir):
    c = passes_until(hires_fix(), "fuse_stages", models_dir)
    members = chain_members(c.stages[1], c.handles)
    (decode, _, d), (upscale, _, u), (scale, _, s), (encode, _, e) = members
    checkpoint, esrgan = c.handles["4"], c.handles["10"]
    assert d == {"samples": StageInput("LATENT", {"samples": 0}), "vae": checkpoint[2]}
    assert u == {"upscale_model": esrgan[0], "image": Link("8", 0)}
    assert s == {"image": Link("11", 0), "upscale_method": "bilinear", "scale_by": 0.5}
    assert e == {"pixels": Link("12", 0), "vae": checkpoint[2]}
    (_, convert_def, convert), = chain_members(passes_until(hires_fix(), "partition_stages", models_dir).stages[-2],
                                               c.handles)
    assert convert_def is TO_UINT8 and convert == {"images": StageInput("IMAGE", {"value": 0})}


def test_a_value_read_twice_is_not_fused(models_dir):
    wf = hires_fix()
    wf["30"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "lowres", "images": ["8", 0]}}
    c = passes_until(wf, "fuse_stages", models_dir, inputs=["5.width=64..256", "5.height"])
    assert [s.name for s in c.stages] == ["empty_latent_5", "sample_3", "module_8", "module_11-12-13", "sample_14",
                                          "module_15-9", "save_9", "module_30", "save_30"]
    empty = c.stages[0]
    assert (empty.inputs, empty.params) == ({"width": "in.5.width", "height": "in.5.height"},
                                           {"channels": 4, "batch_size": 1})
    assert c.stages[3].inputs == {"8.0.value": "8.0.value"} and c.stages[7].inputs == {"8.0.value": "8.0.value"}
    assert [f["node_id"] for f in c.folded] == ["6", "7"]


def test_advanced_sampler_params_and_runtime_steps(models_dir):
    wf = txt2img()
    wf["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "add_noise": "disable", "noise_seed": 5, "steps": 10, "cfg": 1.0, "sampler_name": "euler",
        "scheduler": "normal", "start_at_step": 2, "end_at_step": 8, "return_with_leftover_noise": "enable",
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}}
    sample = passes_until(wf, "fuse_stages", models_dir, inputs=["3.steps"]).stages[0]
    assert sample.inputs["seed"] == "in.3.noise_seed" and sample.inputs["steps"] == "in.3.steps"
    assert sample.params == {"add_noise": "disable", "cfg": 1.0, "sampler_name": "euler",
                             "scheduler": "normal", "start_at_step": 2, "end_at_step": 8,
                             "return_with_leftover_noise": "enable", "prediction": "eps", "scale_factor": 0.18215,
                             "latent_channels": 4}


def test_sdxl_samplers_get_pooled_text_and_size_options(models_dir):
    """The runtime builds ``y`` from the pooled text and the latent's size (sizes may be inputs);
    the y it builds equals the interpreter's encode_adm."""
    from kiln.runtime.kinds.sample import sdxl_y

    c = passes_until(txt2img("tiny-sdxl.safetensors", width=64, height=72), "fuse_stages", models_dir)
    sample = c.stages[0]
    assert sample.inputs["cond_pooled"] == "const.6.0.0.pooled_output"
    assert sample.inputs["uncond_pooled"] == "const.7.0.0.pooled_output"
    assert sample.params["sdxl"] == {"embed_dim": 32, "cond_options": {}, "uncond_options": {}}
    pooled = c.constants["const.6.0.0.pooled_output"]
    expected = c.handles["4"][0].encode_adm(pooled, width=64, height=72, crop_w=0, crop_h=0, target_width=64,
                                            target_height=72)
    assert torch.equal(sdxl_y(sample.params["sdxl"], "cond", pooled, (1, 4, 9, 8)), expected)


@pytest.mark.parametrize("change,inputs,words", [
    (lambda wf: wf.update({"20": {"class_type": "ConditioningCombine", "inputs": {
        "conditioning_1": ["7", 0], "conditioning_2": ["7", 0]}}}) or wf["3"]["inputs"].update(negative=["20", 0]),
     ["6.text"], ["node 3 (KSampler", "input 'positive'", "several conditioning entries", "runtime values 6.0.0.cond"]),
    (lambda wf: wf.update({"20": {"class_type": "LatentFromBatch", "inputs": {
        "samples": ["3", 0], "batch_index": 0, "length": 1}}}) or wf["8"]["inputs"].update(samples=["20", 0]),
     [], ["node 20 (LatentFromBatch", "input 'samples' reads node 3 (KSampler)", "expected at run time: KSampler"]),
    (lambda wf: None, ["8.vae"], ["a VAE socket"]),
    (lambda wf: None, ["9.filename_prefix"],
     ["node 9 (SaveImage", "input 'filename_prefix'", "cannot take this input at run time", "KSampler.sampler_name"]),
])
def test_what_plans_cannot_run_is_refused_by_name(models_dir, change, inputs, words):
    wf = txt2img()
    change(wf)
    message = error_of(lambda: passes_until(wf, "fuse_stages", models_dir, inputs=inputs))
    for word in words:
        assert word in message


def test_a_failing_pass_names_itself_and_the_passes_before_it(models_dir):
    wf = variant(txt2img(), "3", sampler_name="eulr")
    message = error_of(lambda: passes_until(wf, "fuse_stages", models_dir))
    assert message.startswith("compile_failed: compiler pass 'validate' failed (passes run before it: none)")
    wf = txt2img()
    wf["20"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["6", 0], "width": 64, "height": 64,
                                                                "x": 0, "y": 0, "strength": 1.0}}
    wf["3"]["inputs"]["positive"] = ["20", 0]
    message = error_of(lambda: passes_until(wf, "fuse_stages", models_dir, inputs=["6.text"]))
    assert ("compiler pass 'partition_stages' failed (passes run before it: validate, dead_nodes, "
            "runtime_inputs, runtime_loras, merge_identical, fold_constants)") in message
    assert "node 20 (ConditioningSetArea): unsupported_node: ConditioningSetArea would run at run time" in message


# --- value conventions ----------------------------------------------------------------------
def test_flatten_and_unflatten_round_trip():
    cond = [[torch.ones(1, 3, 2), {"pooled_output": torch.zeros(1, 2), "strength": 0.5}]]
    fields, meta = flatten("CONDITIONING", cond)
    assert sorted(fields) == ["0.cond", "0.pooled_output"] and meta == [{"strength": 0.5}]
    back = unflatten("CONDITIONING", fields, meta)
    assert torch.equal(back[0][0], cond[0][0]) and back[0][1]["strength"] == 0.5
    latent = {"samples": torch.ones(1, 4, 2, 2), "noise_mask": torch.ones(1, 1, 2, 2), "batch_index": [3]}
    fields, meta = flatten("LATENT", latent)
    assert sorted(fields) == ["noise_mask", "samples"] and meta == {"batch_index": [3]}
    assert unflatten("LATENT", fields, meta).keys() == latent.keys()
    assert flatten("IMAGE", torch.ones(1, 2, 2, 3))[0].keys() == {"value"}


def test_to_uint8_is_save_images_truncating_conversion():
    images = torch.rand(2, 5, 7, 3) * 1.2 - 0.1
    images[0, 0, 0] = torch.tensor([0.999999, 1 / 255, 254.9999 / 255])
    expected = np.clip(255. * images.numpy(), 0, 255).astype(np.uint8)
    assert np.array_equal(TO_UINT8.function(images)[0].numpy(), expected)


def test_built_chain_computes_what_the_interpreter_computes(models_dir):
    c = passes_until(hires_fix(), "build_modules", models_dir)
    assert [s.module is not None for s in c.stages] == [True, True, True, True, False]
    chain, decode = c.stages[1], c.stages[3]
    latent = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    nodes = {class_type: registry.get(class_type).function for class_type in
             ("VAEDecode", "ImageUpscaleWithModel", "ImageScaleBy", "VAEEncode")}
    vae, esrgan = c.handles["4"][2], c.handles["10"][0]
    with torch.inference_mode():
        image = nodes["VAEDecode"](samples={"samples": latent}, vae=vae)[0]
        image = nodes["ImageUpscaleWithModel"](RunContext(), upscale_model=esrgan, image=image)[0]
        image = nodes["ImageScaleBy"](image=image, upscale_method="bilinear", scale_by=0.5)[0]
        expected = nodes["VAEEncode"](pixels=image, vae=vae)[0]["samples"]
        (samples,) = chain.module(latent)
        (pixels,) = decode.module(latent)
        expected_pixels = TO_UINT8.function(nodes["VAEDecode"](samples={"samples": latent}, vae=vae)[0])[0]
    assert samples.shape == expected.shape == (1, 4, 12, 16)
    assert torch.allclose(samples, expected, atol=1e-5, rtol=0)
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, expected_pixels)


# --- a new plan-capable node needs nodes/ only ------------------------------------------------
def test_a_node_declared_with_a_plan_spec_compiles_into_the_chain(models_dir, monkeypatch):
    """Registering a node with a module PlanSpec is all it takes: partition, fusion and module
    building read the spec (no compiler table names the node)."""
    from kiln.nodes.plan import NodeModule
    from kiln.nodes.registry import SOCKET, NodeDef, PlanSpec

    class Invert(NodeModule):
        def forward(self, image):
            return 1.0 - image

    invert = NodeDef("TestInvert", (SOCKET("image", "IMAGE"),), ("IMAGE",), function=lambda image: (1.0 - image,),
                     plan=PlanSpec("module", computes=("value",), lower=lambda node, w: Invert(node)))
    monkeypatch.setitem(registry._REGISTRY, invert.class_type, invert)
    wf = txt2img()
    wf["20"] = {"class_type": "TestInvert", "inputs": {"image": ["8", 0]}}
    wf["9"]["inputs"]["images"] = ["20", 0]
    c = passes_until(wf, "build_modules", models_dir)
    (decode,) = [s for s in c.stages if s.kind == "module"]
    assert [m.class_type for m in decode.members] == ["VAEDecode", "TestInvert", TO_UINT8.class_type]
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vae = c.handles["4"][2]
    with torch.inference_mode():
        (pixels,) = decode.module(latent)
        image = registry.get("VAEDecode").function(samples={"samples": latent}, vae=vae)[0]
        expected = TO_UINT8.function(invert.function(image=image)[0])[0]
    assert torch.equal(pixels, expected)


def test_catalogue_declarations_that_do_not_fit_fail_at_import():
    from kiln.nodes.registry import INT, SOCKET, NodeDef, PlanSpec, register

    with pytest.raises(ValueError, match="registered twice"):
        register(registry.get("KSampler"))
    with pytest.raises(ValueError, match="module and bind plan specs need lower and computes"):
        PlanSpec("module")
    with pytest.raises(ValueError, match="a bind plan spec needs sockets and bound"):
        PlanSpec("bind", computes=("hint",), lower=lambda node, w: None)
    with pytest.raises(ValueError, match=r"bound sockets \['steps'\] are not sockets of the node"):
        NodeDef("T", (INT("steps", 1),), ("CONDITIONING",), function=lambda steps: (steps,),
                plan=PlanSpec("bind", sockets=("steps",), computes=("hint",), lower=lambda node, w: None,
                              bound=lambda inputs, outputs: {}))
    with pytest.raises(ValueError, match="plan spec kind 'mystery'"):
        PlanSpec("mystery")
    with pytest.raises(ValueError, match="seed widget 'seed' is not one of its inputs"):
        NodeDef("T", (SOCKET("latent", "LATENT"),), ("LATENT",), function=lambda latent: (latent,), seed="seed")
    with pytest.raises(ValueError, match=r"runtime widgets \['steps'\] are not widgets of the node"):
        NodeDef("T", (INT("seed", 0),), ("LATENT",), function=lambda seed: (seed,),
                plan=PlanSpec("sample", runtime_widgets={"steps": "steps"}))
