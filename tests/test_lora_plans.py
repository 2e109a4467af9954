"""LoRAs in plans: a constant LoraLoader merged at compile time, and ``--lora`` applied to a plan's
weights as it loads (no recompilation), checked weight by weight against the compile-time merge
and image by image against the interpreter's LoraLoader chain, on both backends."""
from __future__ import annotations

import pytest
import torch

from kiln.cli import main
from kiln.kernels.errors import KilnError
from kiln.nodes.models.synthetic import write_checkpoint
from kiln.runtime.errors import PlanError
from kiln.runtime.executor import run_plan
from kiln.runtime.lora import LORA_MEMBER, LoraSpec, lora_overrides, read_table
from kiln.runtime.manifest import WEIGHTS_MEMBER
from kiln.runtime.plan import PlanReader, load_plan
from lora_files import kohya_everything, read, save, whole_unet_lora, with_loras
from plan_parity import BACKENDS, assert_parity, backend_compilers
from workflows import txt2img


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder with an SD1 checkpoint, two LoRAs for it (UNet and text encoder) and one
    made for an SDXL UNet."""
    from kiln.demo import write_demo_models

    root = tmp_path_factory.mktemp("lora-plan-models")
    write_demo_models(root)
    base = write_checkpoint(root / "checkpoints" / "base.safetensors", "sd1", seed=11)
    for name, seed in (("style", 6), ("detail", 7)):
        lora, _ = kohya_everything(read(base), 1.0, 1.0, torch.Generator().manual_seed(seed))
        save(lora, root / "loras" / f"{name}.safetensors")
    sdxl = write_checkpoint(tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors", "sdxl", seed=7)
    save(whole_unet_lora(read(sdxl), torch.Generator().manual_seed(8)), root / "loras" / "sdxl-style.safetensors")
    (root / "loras" / "notes.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.fixture(scope="module")
def build(tmp_path_factory, models):
    builders = backend_compilers(models, None, tmp_path_factory, "lora")
    return lambda backend, *args, **kw: builders[backend](*args, **kw)


def _by_fqn(reader: PlanReader, weights: dict) -> dict:
    """Stage name -> FQN -> tensor (weight keys depend on which tensors happen to be equal)."""
    return {stage.name: {fqn: weights[key] for fqn, key in stage.constant_names.items()}
            for stage in reader.manifest.stages if stage.artifact is not None}


@pytest.mark.slow
def test_load_time_lora_equals_the_compile_time_merge_weight_by_weight(build, models, tmp_path):
    """``--lora style:0.8:0.6`` on a plan with its prompts as runtime inputs (the text encoder is
    in the plan) patches UNet and CLIP weights exactly as compiling the LoraLoader in does,
    and renders the interpreter's image."""
    plain = build("aoti", "plain", txt2img("base.safetensors"), inputs=["6.text", "7.text"])
    workflow = with_loras(txt2img("base.safetensors"), ("style.safetensors", 0.8, 0.6))
    merged = build("aoti", "merged", workflow, inputs=["6.text", "7.text"])
    reader = PlanReader(plain)
    table = read_table(reader.member(LORA_MEMBER))
    assert {g["kind"] for g in table["groups"]} == {"model", "clip"}
    spec = LoraSpec(models / "loras" / "style.safetensors", 0.8, 0.6)
    original = reader.tensors(WEIGHTS_MEMBER)
    unpatched = _by_fqn(reader, original)
    overrides = lora_overrides(lambda stage, fqn: unpatched[stage].get(fqn), table, [spec])
    patched = {s: {**w, **overrides.get(s, {})} for s, w in unpatched.items()}
    expected = _by_fqn(PlanReader(merged), PlanReader(merged).tensors(WEIGHTS_MEMBER))
    assert patched.keys() == expected.keys() and {s: w.keys() for s, w in patched.items()} == {
        s: w.keys() for s, w in expected.items()}
    differing = [(s, k) for s, w in expected.items() for k in w if not torch.equal(patched[s][k], w[k])]
    assert not differing, differing[:5]
    changed = {s: sum(not torch.equal(t, unpatched[s][k]) for k, t in w.items()) for s, w in patched.items()}
    assert changed["sample_3"] > 100 and changed["module_6"] > 10 and changed["module_8-9"] == 0, changed
    half = build("aoti", "half", txt2img("base.safetensors"), inputs=["6.text"])   # the negative is folded
    with pytest.raises(PlanError, match="node\\(s\\) 7 were encoded at compile time") as failure:
        load_plan(half, loras=[spec])
    assert "--input 7.text" in failure.value.problem.expected
    loaded = load_plan(plain, loras=[spec])
    assert loaded.loras == (spec,) and 0 < loaded.patch_seconds <= loaded.load_seconds
    assert_parity(workflow, loaded, tmp_path, models, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_time_lora_after_the_plans_own_on_folded_prompts(build, models, tmp_path, backend):
    """A plan with a constant LoRA merged in and folded prompts, then ``--lora detail:0.7:0``:
    the interpreter's chain of two LoraLoaders (the plan's first)."""
    plan = build(backend, "own", with_loras(txt2img("base.safetensors"), ("style.safetensors", 0.5, 0.0)))
    reader = PlanReader(plan)
    groups = read_table(reader.member(LORA_MEMBER))["groups"]
    assert {(g["kind"], tuple(g["folded"]), bool(g["targets"])) for g in groups} == {
        ("model", (), True), ("clip", ("6", "7"), False)}
    chained = with_loras(txt2img("base.safetensors"), ("style.safetensors", 0.5, 0.0),
                         ("detail.safetensors", 0.7, 0.0))
    loaded = load_plan(plan, loras=[LoraSpec(models / "loras" / "detail.safetensors", 0.7, 0.0)])
    assert_parity(chained, loaded, tmp_path, models, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_runtime_lora_name_is_applied_when_the_plan_runs(build, models, tmp_path, backend):
    """``--input 30.lora_name --input 30.strength_model``: the plan holds the weights before the
    LoRA and each run patches them with the LoRA it names (the interpreter's image each time)."""
    workflow = with_loras(txt2img("base.safetensors"), ("style.safetensors", 0.8, 0.0))
    plan = build(backend, "runtime-name", workflow, inputs=["30.lora_name", "30.strength_model"])
    loaded = load_plan(plan)
    assert [s.kind for s in loaded.manifest.stages][0] == "lora"
    assert loaded.manifest.input("30.lora_name").type == "STRING"
    folder = [models / "loras"]
    for i, values in enumerate([{}, {"30.lora_name": "detail.safetensors", "30.strength_model": 0.5}, {}]):
        assert_parity(workflow, loaded, tmp_path / str(i), models, None, values=values, lora_dirs=folder)
    off = run_plan(loaded, {"30.strength_model": 0.0}, output_dir=tmp_path / "off", lora_dirs=folder)
    assert "lora_patch" not in [t.name for t in off.timings]
    assert_parity(workflow, loaded, tmp_path / "plain", models, None, values={"30.strength_model": 0.0},
                  lora_dirs=folder)


def test_runtime_lora_names_are_checked(build, models, tmp_path):
    workflow = with_loras(txt2img("base.safetensors"), ("style.safetensors", 0.8, 0.0))
    loaded = load_plan(build("onnx", "runtime-name", workflow, inputs=["30.lora_name", "30.strength_model"]))
    cases = {"../checkpoints/base.safetensors": "inside the LoRA folders", "/etc/passwd": "inside the LoRA folders",
             "nope.safetensors": "no such LoRA file"}
    for name, words in cases.items():
        with pytest.raises(PlanError, match=words) as failure:
            run_plan(loaded, {"30.lora_name": name}, output_dir=tmp_path / "x", lora_dirs=[models / "loras"])
        problem = failure.value.problem
        assert (problem.node_id, problem.class_type, problem.input_name) == ("30", "LoraLoader", "lora_name")
    with pytest.raises(PlanError, match="given no LoRA folders"):
        run_plan(loaded, {}, output_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_constant_lora_after_a_runtime_one_is_refused(build, models):
    workflow = with_loras(txt2img("base.safetensors"), ("style.safetensors", 0.8, 0.0),
                          ("detail.safetensors", 0.5, 0.0))
    with pytest.raises(KilnError) as failure:
        build("aoti", "order", workflow, inputs=["30.lora_name"])
    problem = failure.value.problems[-1]
    assert (problem.node_id, problem.class_type) == ("31", "LoraLoader")
    assert "--input 31.lora_name" in problem.expected


def test_bad_loras_are_refused_naming_what_was_expected(build, models):
    plan = build("onnx", "folded", txt2img("base.safetensors"))
    loras = models / "loras"
    cases = {
        # A text-encoder LoRA at a CLIP strength on a plan whose prompts were encoded at compile time.
        "style.safetensors:0.8": ("invalid_lora", "node(s) 6, 7 were encoded at compile time"),
        "missing.safetensors": ("missing_lora", "no LoRA file"),
        "notes.safetensors": ("invalid_lora", "not a readable LoRA file"),
        "sdxl-style.safetensors:1:0": ("invalid_lora", "does not fit this plan's model"),
    }
    for text, (code, words) in cases.items():
        with pytest.raises(PlanError) as failure:
            load_plan(plan, loras=[LoraSpec.parse(f"{loras}/{text}")])
        assert failure.value.problem.code == code and words in failure.value.problem.message, text
        assert failure.value.problem.input_name == "--lora"
    with pytest.raises(PlanError, match="FILE"):
        LoraSpec.parse("  ")


def test_spec_syntax():
    assert LoraSpec.parse("a/b.safetensors") == LoraSpec(LoraSpec.parse("a/b.safetensors").path, 1.0, 1.0)
    spec = LoraSpec.parse("C:/loras/x.safetensors:0.8:-0.5")
    assert (str(spec.path), spec.strength_model, spec.strength_clip) == ("C:/loras/x.safetensors", 0.8, -0.5)
    assert LoraSpec.parse("x.safetensors:0.25").strength_clip == 0.25


def test_cli_applies_loras_and_reports_the_patch_time(build, models, tmp_path, capsys):
    plan = build("onnx", "folded", txt2img("base.safetensors"))
    lora = models / "loras" / "detail.safetensors"
    assert main(["run", str(plan), "--lora", f"{lora}:0.7:0", "--timings", "--quiet",
                 "-o", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "LoRA patch" in err and out.strip().endswith(".png")
    assert main(["run", str(plan), "--lora", f"{lora}:0.7", "-o", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "--input 6.text --input 7.text" in err and "Traceback" not in err
    assert not (tmp_path / "refused").exists()


def test_lora_option_on_a_workflow_points_at_the_lora_loader(tmp_path, capsys):
    workflow = tmp_path / "w.json"
    workflow.write_text("{}")
    assert main(["run", str(workflow), "--lora", "x.safetensors"]) == 2
    assert "LoraLoader" in capsys.readouterr().err


def test_interpreter_refuses_the_same_sdxl_lora(models, tmp_path):
    """The same file through the interpreter's LoraLoader: also refused (parity of refusals)."""
    from kiln.api import run_workflow

    workflow = with_loras(txt2img("base.safetensors"), ("sdxl-style.safetensors", 1.0, 0.0))
    with pytest.raises(KilnError):
        run_workflow(workflow, models=models, output_dir=tmp_path)


def test_kiln_serve_applies_each_requests_lora_from_one_plan(build, models, tmp_path):
    """A plan compiled with ``--input 30.lora_name`` serves prompts naming other LoRAs of the
    server's loras/ folder (the interpreter's image each), and a name that is not there gets
    ComfyUI's validation error before anything runs."""
    import io

    import numpy as np
    import requests
    from PIL import Image

    from kiln.api import run_workflow
    from serve_client import Server
    from workflows import variant

    workflow = with_loras(txt2img("base.safetensors"), ("style.safetensors", 0.8, 0.0))
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "lora.plan").write_bytes(build("onnx", "served", workflow, inputs=["30.lora_name"]).read_bytes())
    served = Server(models, models / "none", tmp_path / "output", "--plans", str(plans))
    try:
        images = {}
        for name in ("detail.safetensors", "style.safetensors"):
            request = variant(workflow, "30", lora_name=name)
            entry = served.wait_for_history(served.queue_prompt(request)["prompt_id"])
            assert entry["kiln"]["engine"] == "plan lora"
            images[name] = np.asarray(Image.open(io.BytesIO(served.first_image(entry))), dtype=np.int16)
            ref = run_workflow(request, models=models, output_dir=tmp_path / name)
            assert np.abs(images[name] - np.asarray(Image.open(ref.saved[0]), dtype=np.int16)).max() <= 2
        assert not np.array_equal(*images.values())
        refused = requests.post(served.url + "/prompt", json={"prompt": variant(workflow, "30", lora_name="x.pt")})
        assert refused.status_code == 400 and refused.json()["node_errors"]["30"]
    finally:
        served.stop()
