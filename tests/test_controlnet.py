"""ControlNetLoader / ControlNetApply / ControlNetApplyAdvanced: both file layouts, residuals
checked against the UNet's own skips (an identity ControlNet built from its input half), the
hint's resize, strength, window and chaining, and the refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kiln.api import run_workflow
from kiln.kernels.errors import KilnError
from kiln.nodes.guider import prepare_conds
from kiln.nodes.models.checkpoint import load_checkpoint
from kiln.nodes.models.controlnet import Control, load_controlnet
from kiln.nodes.models.synthetic import write_checkpoint
from kiln.runtime.errors import PlanError
from kiln.runtime.executor import run_plan
from kiln.runtime.plan import load_plan
from controlnet_files import controlnet_state_dict, diffusers_layout
from lora_files import read, save
from plan_parity import BACKENDS, assert_parity, backend_compilers
from workflows import render, txt2img


def _skips(model, x, sigma, context, y):
    """The UNet's own skip activations (conv_in's, then every down block's) and middle output."""
    skips, middle, unet = [], [], model.unet
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: skips.append(o)),
             unet.mid_block.register_forward_hook(lambda m, i, o: middle.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: skips.extend(o[1])) for b in unet.down_blocks]
    model.apply_model(x, sigma, context, y)
    for hook in hooks:
        hook.remove()
    return skips, middle[0]


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_identity_controlnet_returns_the_unets_skips(arch, layout, tmp_path):
    path = write_checkpoint(tmp_path / f"{arch}.safetensors", arch, seed=3)
    model, _, _ = load_checkpoint(path)
    original = controlnet_state_dict(read(path))
    net = load_controlnet(original if layout == "original" else diffusers_layout(original), tmp_path / "cn.safetensors")
    assert net.family == arch and not net.global_average_pooling
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 3.0])
    context = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=g)
    y = torch.randn(2, model.unet.config.projection_class_embeddings_input_dim, generator=g) if arch == "sdxl" else None
    down, mid = net.residuals(x, sigma, torch.rand(2, 3, 64, 64, generator=g), context, y, model)
    skips, middle = _skips(model, x, sigma, context, y)
    assert len(down) == len(skips)
    for got, want in zip(down, skips):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(mid, middle, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def sd1_parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn")
    path = write_checkpoint(folder / "sd1.safetensors", "sd1", seed=3)
    model, _, _ = load_checkpoint(path)
    return model, read(path), folder


def test_strength_window_and_chaining(sd1_parts):
    model, sd, folder = sd1_parts
    a = load_controlnet(controlnet_state_dict(sd, identity=False, seed=1), folder / "a.safetensors")
    b = load_controlnet(controlnet_state_dict(sd, identity=False, seed=2), folder / "b.safetensors")
    hint = torch.rand(1, 3, 64, 64)
    first = Control(a, hint, 0.5, (0.0, 1.0))
    chained = Control(b, hint, 2.0, (0.0, 0.5), previous=first)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    ms = model.model_sampling
    early, late = torch.tensor([ms.percent_to_sigma(0.2)] * 2), torch.tensor([ms.percent_to_sigma(0.8)] * 2)
    ra, rb = a.residuals(x, early, hint.repeat(2, 1, 1, 1), context, None, model), \
        b.residuals(x, early, hint.repeat(2, 1, 1, 1), context, None, model)
    out = chained.get_control(x, early, context, None, 2, model)
    for got, da, db in zip(out["output"] + out["middle"], ra[0] + [ra[1]], rb[0] + [rb[1]]):
        torch.testing.assert_close(got, da * 0.5 + db * 2.0)   # ComfyUI: previous + this one
    late_out = chained.get_control(x, late, context, None, 2, model)   # b's window (0..0.5) is over
    ra_late = a.residuals(x, late, hint.repeat(2, 1, 1, 1), context, None, model)
    for got, da in zip(late_out["output"], ra_late[0]):
        torch.testing.assert_close(got, da * 0.5)
    assert Control(a, hint, 1.0, (0.9, 1.0)).get_control(x, early, context, None, 2, model) is None


def test_a_hint_of_another_size_is_center_cropped_and_resized_nearest(sd1_parts):
    model, sd, folder = sd1_parts
    net = load_controlnet(controlnet_state_dict(sd), folder / "c.safetensors")
    hint = torch.rand(1, 3, 60, 100)   # wider than the 64x64 the 8x8 latent needs
    control = Control(net, hint, 1.0, (0.0, 1.0))
    got = control._hint(torch.zeros(2, 4, 8, 8), 2)
    crop = round((100 - 100 * 1.0 / (100 / 60)) / 2)   # ComfyUI's center crop to the target aspect
    expected = F.interpolate(hint[:, :, :, crop:100 - crop], size=(64, 64), mode="nearest-exact")
    assert got.shape == (1, 3, 64, 64) and torch.equal(got, expected)


def test_old_apply_node_controls_the_negative_side_too(sd1_parts):
    from kiln.nodes.controlnet import controlnet_apply

    model, sd, folder = sd1_parts
    net = load_controlnet(controlnet_state_dict(sd), folder / "d.safetensors")
    positive = [[torch.zeros(1, 77, 32), {}]]
    (controlled,) = controlnet_apply(positive, net, torch.rand(1, 64, 64, 3), 0.8)
    conds = prepare_conds(model, {"positive": controlled, "negative": [[torch.zeros(1, 77, 32), {}]]},
                          torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), None)
    assert conds["negative"][0].control is conds["positive"][0].control is controlled[0][1]["control"]


def _controlnet_workflow(strength=1.0, start=0.0, end=1.0, hint="hint.png") -> dict:
    workflow = txt2img()
    workflow.update({
        "20": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}},
        "21": {"class_type": "LoadImage", "inputs": {"image": hint}},
        "22": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "control_net": ["20", 0], "image": ["21", 0],
            "strength": strength, "start_percent": start, "end_percent": end}},
    })
    workflow["3"]["inputs"].update(positive=["22", 0], negative=["22", 1])
    return workflow


@pytest.fixture(scope="module")
def cn_models(tmp_path_factory):
    from kiln.demo import write_demo_models

    root = tmp_path_factory.mktemp("cn-models")
    write_demo_models(root)
    base = read(root / "checkpoints" / "tiny-sd15.safetensors")
    save(controlnet_state_dict(base, identity=False, seed=4), root / "controlnet" / "canny.safetensors")
    inputs = tmp_path_factory.mktemp("cn-input")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(inputs / "hint.png")
    return root, inputs


def test_controlnet_workflow_strength_and_window(cn_models, tmp_path):
    models, inputs = cn_models
    plain = render(txt2img(), models, inputs, tmp_path / "plain")
    controlled = render(_controlnet_workflow(), models, inputs, tmp_path / "cn")
    assert not np.array_equal(controlled, plain)
    assert np.array_equal(render(_controlnet_workflow(strength=0.0), models, inputs, tmp_path / "off"), plain)
    never = _controlnet_workflow(start=1.0, end=1.0)   # a window no step falls in
    assert np.array_equal(render(never, models, inputs, tmp_path / "never"), plain)


def test_a_file_that_is_no_controlnet_is_refused(cn_models, tmp_path):
    models, inputs = cn_models
    (models / "controlnet" / "lora.safetensors").write_bytes((models / "checkpoints" / "tiny-sd15.safetensors")
                                                            .read_bytes())
    workflow = _controlnet_workflow()
    workflow["20"]["inputs"]["control_net_name"] = "lora.safetensors"
    with pytest.raises(KilnError) as failure:
        run_workflow(workflow, models=models, input_dir=inputs, output_dir=tmp_path)
    (problem,) = failure.value.problems
    assert (problem.node_id, problem.input_name) == ("20", "control_net_name")
    assert "expected a ControlNet" in problem.message


@pytest.fixture(scope="module")
def cn_build(cn_models, tmp_path_factory):
    return backend_compilers(*cn_models, tmp_path_factory, "cn")


@pytest.mark.parametrize("backend", BACKENDS)
def test_controlnet_plans_match_the_interpreter(cn_models, cn_build, tmp_path, backend):
    """ControlNetApplyAdvanced over the whole schedule, chained with ControlNetApply: the
    ControlNets run inside the compiled denoiser, their hint (a constant) resized there."""
    models, inputs = cn_models
    workflow = _controlnet_workflow(strength=0.7)
    workflow["23"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["22", 0], "control_net": ["20", 0],
                                                                  "image": ["21", 0], "strength": 0.4}}
    workflow["3"]["inputs"]["positive"] = ["23", 0]
    plan = cn_build[backend]("chained", workflow)
    assert [s.kind for s in load_plan(plan).manifest.stages] == ["sample", "module", "save_image"]
    assert_parity(workflow, plan, tmp_path, models, inputs)


def test_a_controlnet_window_compiles_as_a_select_on_sigma(cn_models, cn_build, tmp_path):
    """start/end percent inside the plan: residuals only in the window, zeros outside (the skips
    unchanged), chained with a whole-schedule ControlNet."""
    models, inputs = cn_models
    workflow = _controlnet_workflow(start=0.3, end=0.8)
    workflow["23"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["22", 0], "control_net": ["20", 0],
                                                                  "image": ["21", 0], "strength": 0.4}}
    workflow["3"]["inputs"]["positive"] = ["23", 0]
    assert_parity(workflow, cn_build["onnx"]("windowed", workflow), tmp_path, models, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_runtime_hint_image_is_loaded_and_bound_at_run_time(cn_models, cn_build, tmp_path, backend):
    """``--input 21.image``: a load_image stage reads the hint, a module stage turns it into the
    Controls' hint, which the compiled denoiser takes as an input in place of its buffer; the
    hint's resize to the latent then runs at the plan's size, so other hint sizes are refused."""
    models, inputs = cn_models
    other = "hint2.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(inputs / other)
    workflow = _controlnet_workflow(strength=0.9)
    plan_path = cn_build[backend]("runtime-hint", workflow, inputs=("21.image",))
    plan = load_plan(plan_path)
    stages = plan.manifest.stages
    assert [s.kind for s in stages] == ["load_image", "module", "sample", "module", "save_image"]
    assert [name for name in stages[2].inputs if name.startswith("bound.")] == ["bound.22.0.control_hint"]
    assert_parity(workflow, plan, tmp_path / "default", models, inputs)
    swapped = dict(workflow, **{"21": {"class_type": "LoadImage", "inputs": {"image": other}}})
    assert_parity(swapped, plan, tmp_path / "other", models, inputs, values={"21.image": other})
    assert not np.array_equal(render(workflow, models, inputs, tmp_path / "a"),
                              render(swapped, models, inputs, tmp_path / "b"))
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(inputs / "small.png")
    with pytest.raises(PlanError, match=r"21.*image.*compiled for images of this size.*1x48x80x3.*1x40x40x3"):
        run_plan(plan, {"21.image": "small.png"}, output_dir=tmp_path / "small", input_dir=inputs)
    for name, message in (("../hint.png", "a file inside the input folder"), ("none.png", "no such image")):
        with pytest.raises(PlanError, match=message):
            run_plan(plan, {"21.image": name}, output_dir=tmp_path / "bad", input_dir=inputs)


def test_kiln_serve_answers_an_uploaded_hint_from_the_plan(cn_models, cn_build, tmp_path):
    """A plan compiled with ``--input 21.image`` serves prompts naming an image uploaded to the
    server (ComfyUI's /upload/image), with the interpreter's image."""
    import io

    import requests

    from serve_client import Server
    from workflows import variant

    models, inputs = cn_models
    workflow = _controlnet_workflow(strength=0.9)
    plans, served_inputs = tmp_path / "plans", tmp_path / "input"
    plans.mkdir()
    served_inputs.mkdir()
    (served_inputs / "hint.png").write_bytes((inputs / "hint.png").read_bytes())
    (plans / "hint.plan").write_bytes(cn_build["onnx"]("served-hint", workflow, inputs=("21.image",)).read_bytes())
    rng = np.random.default_rng(5)
    upload = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(upload, format="PNG")
    served = Server(models, served_inputs, tmp_path / "output", "--plans", str(plans))
    try:
        stored = requests.post(served.url + "/upload/image", files={"image": ("pose.png", upload.getvalue())})
        assert stored.status_code == 200 and stored.json()["name"] == "pose.png"
        request = variant(workflow, "21", image="pose.png")
        entry = served.wait_for_history(served.queue_prompt(request)["prompt_id"])
        assert entry["kiln"]["engine"] == "plan hint"
        got = np.asarray(Image.open(io.BytesIO(served.first_image(entry))), dtype=np.int16)
        ref = run_workflow(request, models=models, input_dir=served_inputs, output_dir=tmp_path / "ref")
        assert np.abs(got - np.asarray(Image.open(ref.saved[0]), dtype=np.int16)).max() <= 2
    finally:
        served.stop()
