"""ONNX plans (``kiln compile --backend onnx``) against the interpreter on the tiny fixtures (CPU, fp32),
plus what is ONNX-only: weights shared between graphs, the opset in the manifest and the choice of
onnxruntime execution provider (fallback with a notice, or a clear failure when forced)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from kiln.api import run_workflow
from kiln.cli import main
from kiln.compiler.lower.onnx_export import OPSET
from kiln.compiler.lower.ort_optimize import bind_to_plan
from kiln.runtime.errors import PlanError
from kiln.runtime.executor import run_plan
from kiln.runtime.manifest import CONSTANTS_MEMBER, WEIGHTS_MEMBER
from kiln.runtime.ort import CPU, PLAN_FILE, choose_providers, nchwc_block_size
from kiln.runtime.ort_layouts import relayouts
from kiln.runtime.plan import PlanReader, describe_plan, load_plan
from kiln.runtime.writer import PlanWriter
from plan_parity import (LONG_PROMPT, PARITY, assert_parity, check_runtime_prompt, compiled_files, measure,
                         plan_compiler)
from workflows import PLAN_VARIANTS, clip_skip, hires_fix, img2img, txt2img

T2I_INPUTS = ["5.width=64..96", "5.height=48..80", "5.batch_size=1..2"]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kiln-onnx-cache")


@pytest.fixture(scope="module")
def compile_onnx(onnx_cache, models_dir, input_dir, tmp_path_factory):
    return plan_compiler(tmp_path_factory.mktemp("onnx-plans"), models_dir, input_dir, "onnx", onnx_cache)


@pytest.fixture(scope="module")
def t2i_plan(compile_onnx):
    return compile_onnx("t2i", txt2img(), T2I_INPUTS)


@pytest.fixture(scope="module")
def hires_plan(compile_onnx, t2i_plan):   # after t2i: the denoiser and final decode come from the cache
    return compile_onnx("hires", hires_fix())


# --- parity ------------------------------------------------------------------------------------
def test_txt2img_onnx_plan_matches_interpreter(t2i_plan, tmp_path, models_dir, input_dir):
    assert_parity(txt2img(), t2i_plan, tmp_path, models_dir, input_dir)


def test_img2img_onnx_plan_matches_interpreter(compile_onnx, tmp_path, models_dir, input_dir):
    workflow = img2img()
    assert_parity(workflow, compile_onnx("i2i", workflow), tmp_path, models_dir, input_dir)


def test_hires_fix_onnx_plan_matches_interpreter(hires_plan, tmp_path, models_dir, input_dir):
    assert_parity(hires_fix(), hires_plan, tmp_path, models_dir, input_dir)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "tiled" else n
                                  for n in PLAN_VARIANTS])   # the tiled chain: ESRGAN unrolled per tile
def test_variant_matches_interpreter(compile_onnx, name, tmp_path, models_dir, input_dir):
    workflow = PLAN_VARIANTS[name]()
    assert_parity(workflow, compile_onnx(name, workflow), tmp_path, models_dir, input_dir)


@pytest.mark.parametrize("workflow", [txt2img(), hires_fix()], ids=["txt2img", "hires-fix"])
def test_fp16_weight_storage_halves_the_weights_and_keeps_fp32_parity(compile_onnx, workflow, tmp_path, models_dir,
                                                                       input_dir, capsys):
    """``--weights fp16``: the weights member is half the size, upcast at load, and the image stays
    within the fp32 parity bound."""
    full = compile_onnx(f"full-{len(workflow)}", workflow)
    half = compile_onnx(f"half-{len(workflow)}", workflow, weights="fp16")
    sizes = [load_plan(p).member_sizes[WEIGHTS_MEMBER] for p in (full, half)]
    assert sizes[1] < sizes[0] * 0.52
    loaded = load_plan(half)
    assert loaded.manifest.target["weights"] == "fp16"
    assert all(t.dtype != torch.float16 for t in loaded.stage_loader.weights.values())
    psnr, max_diff = measure(workflow, loaded, tmp_path, models_dir, input_dir)
    print(f"fp16 weights: {psnr:.1f} dB, max diff {max_diff:g}")
    assert psnr >= PARITY["fp32"][0] and max_diff <= PARITY["fp32"][1]
    assert "weights stored as fp16" in describe_plan(half)


def test_declared_sizes_run_without_reexport(t2i_plan, onnx_cache, tmp_path, models_dir, input_dir):
    before = compiled_files(onnx_cache)
    assert_parity(txt2img(), t2i_plan, tmp_path, models_dir, input_dir,
            {"5.width": 96, "5.height": 48, "5.batch_size": 2, "3.seed": 11})
    assert compiled_files(onnx_cache) == before
    with pytest.raises(PlanError, match="outside the range.*64..96"):
        run_plan(load_plan(t2i_plan), {"5.width": 104}, output_dir=tmp_path / "refused")


def test_sampler_and_scheduler_taken_at_run_time(compile_onnx, tmp_path, models_dir, input_dir):
    """One plan serves every sampler and schedule (kiln bench's sampler studies): the sampler loop
    runs in the runtime around the compiled denoiser, as in the interpreter."""
    plan = load_plan(compile_onnx("samplers", txt2img(), ["3.sampler_name", "3.scheduler", "3.steps"]))
    for sampler, scheduler in (("dpmpp_2m", "karras"), ("heun", "exponential")):
        values = {"3.sampler_name": sampler, "3.scheduler": scheduler, "3.steps": 5}
        assert_parity(txt2img(), plan, tmp_path / sampler, models_dir, input_dir, values)
    calls = []
    run_plan(plan, {"3.sampler_name": "heun", "3.steps": 5}, output_dir=tmp_path / "count",
             on_model_call=lambda: calls.append(1))
    assert len(calls) == 9   # heun: two evaluations per step, one for the last


# --- the plan file -----------------------------------------------------------------------------
def test_onnx_graphs_are_stored_optimized_and_read_their_weights_from_the_plan_file(hires_plan):
    """CPU graphs are stored as onnxruntime optimized them (NCHWc convolutions, folded weight
    transposes) and address each tensor in the plan file itself: the bytes at the offset an
    initializer names are the weights member's tensor. Both samplers share one artifact and the
    graphs share one stored copy of every tensor."""
    reader = PlanReader(hires_plan)
    manifest = reader.manifest
    assert manifest.target == {"device": "cpu", "dtype": "fp32", "backend": "onnx", "onnx_opset": OPSET,
                               "onnx_cpu": {"onnxruntime": onnxruntime.__version__, "nchwc_block": nchwc_block_size()}}
    first, second = (s for s in manifest.stages if s.kind == "sample")
    assert first.artifact == second.artifact == "stages/sample_3.onnx"
    assert first.constant_names == second.constant_names
    weights = reader.tensors(WEIGHTS_MEMBER)
    data = hires_plan.read_bytes()
    for stage in (s for s in manifest.stages if s.artifact):
        assert stage.optimized and stage.artifact.endswith(".onnx")
        graph = onnx.load_model_from_string(bytes(reader.member(stage.artifact))).graph
        assert any(node.domain == "com.microsoft.nchwc" for node in graph.node)
        external = {t.name: t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert set(external) == set(stage.constant_names)
        for name, tensor in external.items():
            place = {entry.key: entry.value for entry in tensor.external_data}
            assert place["location"] == PLAN_FILE
            start, length = int(place["offset"]), int(place["length"])
            assert data[start:start + length] == weights[stage.constant_names[name]].numpy().tobytes()
    layouts = {entry["layout"] for entry in first.relayouts.values()}
    assert {"nchwc", "transpose"} <= layouts, layouts
    assert {key for s in manifest.stages for key in s.constant_names.values()} == set(weights)


def test_running_an_onnx_plan_imports_nothing_heavy(t2i_plan, tmp_path):
    child = """
import json, sys
from kiln.cli import main
rc = main(["run", sys.argv[1], "-o", sys.argv[2], "--quiet", "--timings"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers", "onnx", "onnxscript")
               or m.startswith(("kiln.compiler", "kiln.nodes", "torch._inductor", "torch.onnx")))
print(json.dumps({"rc": rc, "heavy": heavy}))
"""
    out = subprocess.run([sys.executable, "-c", child, str(t2i_plan), str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "heavy": []}
    assert f"({CPU})" in out.stderr and (tmp_path / "t2i_00001_.png").is_file()


# --- execution providers -----------------------------------------------------------------------
def test_provider_order_and_cpu_fallback(capsys):
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]
    assert choose_providers("cuda", None, gpu) == gpu
    assert choose_providers("cuda:1", None, ["CUDAExecutionProvider", CPU]) == ["CUDAExecutionProvider", CPU]
    assert choose_providers("cpu", None, gpu) == [CPU]
    assert choose_providers("cpu", "cuda", gpu) == ["CUDAExecutionProvider", CPU]
    assert capsys.readouterr().err == ""
    assert choose_providers("cuda", None, [CPU]) == [CPU]
    assert "notice: the plan targets cuda but onnxruntime offers no GPU provider" in capsys.readouterr().err


def test_forcing_a_missing_provider_fails_clearly(t2i_plan, tmp_path, capsys):
    with pytest.raises(PlanError, match="--provider cuda: onnxruntime offers no CUDAExecutionProvider here"):
        load_plan(t2i_plan, provider="cuda")
    rc = main(["run", str(t2i_plan), "-o", str(tmp_path), "--provider", "tensorrt", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "TensorrtExecutionProvider" in err and "kiln[gpu]" in err
    assert not any(tmp_path.iterdir())


ONNX_REFUSALS = {
    "onnxruntime_version": (
        lambda plan, dst: _retarget(plan, dst, onnx_cpu={"onnxruntime": "1.0.0", "nchwc_block": nchwc_block_size()}),
        "plan_version_mismatch: the plan's graphs were optimized for another onnxruntime (expected onnxruntime "
        f"1.0.0; found onnxruntime {onnxruntime.__version__}) (recompile the plan on this machine with kiln "
        "compile --backend onnx)"),
    "nchwc_block": (
        lambda plan, dst: _retarget(plan, dst, onnx_cpu={"onnxruntime": onnxruntime.__version__, "nchwc_block": 8}),
        "plan_device_unavailable: the plan's graphs were optimized for a CPU with another convolution layout "
        f"(NCHWc block size) (expected block 8; found block {nchwc_block_size()} on this CPU) (recompile the plan "
        "on this machine with kiln compile --backend onnx)"),
    "repacked": (
        lambda plan, dst: _repacked(plan, dst),
        "invalid_plan: weights.safetensors is not where the plan's graphs read it (the file was re-packed) "
        "(expected offset "),
}


@pytest.mark.parametrize("case", list(ONNX_REFUSALS))
def test_optimized_graphs_refused_where_they_cannot_run(case, t2i_plan, tmp_path, capsys):
    """A plan whose graphs were optimized for another onnxruntime or CPU layout, or whose zip was
    re-packed (the graphs address their weights in the file): refused before any session opens."""
    make, message = ONNX_REFUSALS[case]
    bad = make(t2i_plan, tmp_path / "bad.plan")
    with pytest.raises(PlanError) as info:
        load_plan(bad)
    assert info.value.format().startswith(message), info.value.format()
    assert main(["run", str(bad), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: " + message)
    assert not (tmp_path / "out").exists()


def test_an_optimized_plan_refuses_a_gpu_provider(t2i_plan, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", CPU])
    with pytest.raises(PlanError, match="--provider cuda: this plan's graphs were optimized for onnxruntime's CPU "
                                        "provider .*compile with --device cuda"):
        load_plan(t2i_plan, provider="cuda")


def _repacked(plan, dst):
    """The same members in a zip written by another tool (no alignment padding: the weights move)."""
    with zipfile.ZipFile(plan) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return dst


def test_cuda_plan_without_gpu_provider_runs_on_cpu_with_a_notice(t2i_plan, tmp_path, capsys, models_dir,
                                                                  input_dir):
    cuda_plan = _retarget(t2i_plan, tmp_path / "cuda.plan", device="cuda")
    plan = load_plan(cuda_plan)
    assert "notice: the plan targets cuda" in capsys.readouterr().err
    assert plan.providers == [CPU] and plan.device.type == "cpu"
    assert_parity(txt2img(), plan, tmp_path, models_dir, input_dir)


def _retarget(source, dest, **target):
    """The same plan with another target (a CUDA plan cannot be compiled on this machine)."""
    reader = PlanReader(source)
    manifest = reader.manifest
    weights = reader.tensors(WEIGHTS_MEMBER)
    writer = PlanWriter(dest, backend="onnx")
    for stage in manifest.stages:
        if stage.artifact is not None:
            writer.add_artifact(stage.name, bytes(reader.member(stage.artifact)),
                                {fqn: weights[key] for fqn, key in stage.constant_names.items()},
                                constant_names=list(stage.constant_names), relayouts=relayouts(stage.relayouts),
                                bind=bind_to_plan)
    writer.add_constants(reader.tensors(CONSTANTS_MEMBER))
    written = ("artifact", "constant_names", "optimized", "relayouts")
    stages = [{k: v for k, v in vars(s).items() if k not in written} for s in manifest.stages]
    return writer.write({"target": {**manifest.target, **target}, "workflow": manifest.workflow,
                         "inputs": [vars(i) for i in manifest.inputs], "stages": stages,
                         "folded": manifest.folded, "dropped_models": manifest.dropped_models})


def test_runtime_prompt(compile_onnx, tmp_path, models_dir, input_dir):
    plan = compile_onnx("text", txt2img(), ["6.text"])
    check_runtime_prompt(txt2img(), plan, tmp_path, models_dir, input_dir)
    assert _all_optimized(plan)   # the text encoder's fp16 weights, cast and re-laid, are followed too


def _all_optimized(plan) -> bool:
    return all(s.optimized for s in PlanReader(plan).manifest.stages if s.artifact is not None)


@pytest.mark.parametrize("workflow", [txt2img("tiny-sd2-v.safetensors"), clip_skip(txt2img())],
                         ids=["sd2-openclip", "sd15-clip-skip-2"])
def test_runtime_prompt_other_encoders(compile_onnx, workflow, tmp_path, models_dir, input_dir):
    """OpenCLIP's padding and penultimate layer; CLIPSetLastLayer before a runtime prompt."""
    plan = load_plan(compile_onnx(f"text-{workflow['4']['inputs']['ckpt_name']}-{len(workflow)}", workflow,
                                  ["6.text"]))
    assert_parity(workflow, plan, tmp_path, models_dir, input_dir, {"6.text": LONG_PROMPT})


def test_sdxl_runtime_prompt_and_size(compile_onnx, tmp_path, models_dir, input_dir):
    """SDXL: both text encoders run at run time and ``y`` follows the prompt's pooled output and the
    latent's runtime size."""
    workflow = txt2img("tiny-sdxl.safetensors")
    path = compile_onnx("sdxl-text", workflow, ["6.text", "5.width=64..96"])
    assert _all_optimized(path)
    plan = load_plan(path)
    for index, values in enumerate(({}, {"6.text": LONG_PROMPT, "5.width": 96, "3.seed": 2})):
        assert_parity(workflow, plan, tmp_path / str(index), models_dir, input_dir, values)


def test_hires_fix_with_a_runtime_size(compile_onnx, tmp_path, models_dir, input_dir):
    """The whole HiRes chain (decode, one-tile upscale, scale, encode) follows a runtime width."""
    plan = load_plan(compile_onnx("hires-width", hires_fix(), ["5.width=64..128"]))
    for width in (96, 128):
        assert_parity(hires_fix(), plan, tmp_path / str(width), models_dir, input_dir, {"5.width": width})


def test_preview_images_are_written_as_the_interpreter_writes_them(compile_onnx, tmp_path, models_dir, input_dir):
    """PreviewImage of HiRes fix's first pass (an image inside the fused chain): a temp preview
    under .preview/ with the same pixels as the interpreter's, next to the saved image."""
    workflow = hires_fix()
    workflow["30"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    plan = load_plan(compile_onnx("preview", workflow))
    assert {"preview": True, "node_id": "30"} in [s.params for s in plan.manifest.stages]
    got = run_plan(plan, {}, output_dir=tmp_path / "plan")
    ref = run_workflow(workflow, models=models_dir, input_dir=input_dir, output_dir=tmp_path / "interp")
    (preview,) = got.previews
    assert os.path.basename(os.path.dirname(preview)) == ".preview"
    assert os.path.basename(preview).startswith("ComfyUI_temp_") and len(got.saved) == 1
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (preview, ref.previews[0]))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
