"""ONNX plans (``kiln compile --backend onnx``) against the interpreter on the tiny fixtures (CPU, fp32),
plus what is ONNX-only: weights shared between graphs, the opset in the manifest and the choice of
onnxruntime execution provider (fallback with a notice, or a clear failure when forced)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from kiln.api import run_workflow
from kiln.cli import main
from kiln.compiler.lower.onnx_export import OPSET
from kiln.compiler.pipeline import compile_workflow
from kiln.runtime.errors import PlanError
from kiln.runtime.executor import run_plan
from kiln.runtime.manifest import CONSTANTS_MEMBER, WEIGHTS_MEMBER
from kiln.runtime.ort import CPU, choose_providers
from kiln.runtime.plan import PlanReader, load_plan
from kiln.runtime.writer import PlanWriter
from workflows import hires_fix, img2img, txt2img

MIN_PSNR_FP32 = 60.0
MAX_PIXEL_DIFF = 2   # uint8 truncation turns a tiny float difference at a boundary into 1
T2I_INPUTS = ["5.width=64..96", "5.height=48..80", "5.batch_size=1..2"]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("kiln-onnx-cache")
    old = os.environ.get("KILN_CACHE_DIR")
    os.environ["KILN_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        del os.environ["KILN_CACHE_DIR"]
    else:
        os.environ["KILN_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def compile_onnx(onnx_cache, models_dir, input_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-plans")

    def build(name: str, workflow: dict, inputs=()):
        return compile_workflow(workflow, models=models_dir, input_dir=input_dir, inputs=inputs, backend="onnx",
                                output=folder / f"{name}.plan")
    return build


@pytest.fixture(scope="module")
def t2i_plan(compile_onnx):
    return compile_onnx("t2i", txt2img(), T2I_INPUTS)


@pytest.fixture(scope="module")
def hires_plan(compile_onnx, t2i_plan):   # after t2i: the denoiser and final decode come from the cache
    return compile_onnx("hires", hires_fix())


def _pixels(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in paths])


def _parity(workflow, plan, tmp_path, models_dir, input_dir, values=None) -> None:
    """The plan's images against the interpreter's: PSNR >= 60 dB and max pixel difference <= 2."""
    overrides = {tuple(k.split(".", 1)): v for k, v in (values or {}).items()}
    ref = run_workflow(workflow, models=models_dir, input_dir=input_dir, output_dir=tmp_path / "interp",
                       overrides=overrides)
    loaded = load_plan(plan) if isinstance(plan, (str, os.PathLike)) else plan
    got = run_plan(loaded, values or {}, output_dir=tmp_path / "plan")
    assert [os.path.basename(p) for p in got.saved] == [os.path.basename(p) for p in ref.saved]
    a, b = _pixels(ref.saved), _pixels(got.saved)
    assert a.shape == b.shape
    mse = float(((a - b) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
    assert psnr >= MIN_PSNR_FP32, f"PSNR {psnr:.1f} dB"
    assert np.abs(a - b).max() <= MAX_PIXEL_DIFF


def _compiled_files(cache) -> set[str]:
    folder = cache / "compiled"
    return set(os.listdir(folder)) if folder.is_dir() else set()


# --- parity ------------------------------------------------------------------------------------
def test_txt2img_onnx_plan_matches_interpreter(t2i_plan, tmp_path, models_dir, input_dir):
    _parity(txt2img(), t2i_plan, tmp_path, models_dir, input_dir)


def test_img2img_onnx_plan_matches_interpreter(compile_onnx, tmp_path, models_dir, input_dir):
    workflow = img2img()
    _parity(workflow, compile_onnx("i2i", workflow), tmp_path, models_dir, input_dir)


def test_hires_fix_onnx_plan_matches_interpreter(hires_plan, tmp_path, models_dir, input_dir):
    _parity(hires_fix(), hires_plan, tmp_path, models_dir, input_dir)


def test_declared_sizes_run_without_reexport(t2i_plan, onnx_cache, tmp_path, models_dir, input_dir):
    before = _compiled_files(onnx_cache)
    _parity(txt2img(), t2i_plan, tmp_path, models_dir, input_dir,
            {"5.width": 96, "5.height": 48, "5.batch_size": 2, "3.seed": 11})
    assert _compiled_files(onnx_cache) == before
    with pytest.raises(PlanError, match="outside the range.*64..96"):
        run_plan(load_plan(t2i_plan), {"5.width": 104}, output_dir=tmp_path / "refused")


# --- the plan file -----------------------------------------------------------------------------
def test_onnx_artifacts_share_one_copy_of_the_weights(hires_plan):
    reader = PlanReader(hires_plan)
    manifest = reader.manifest
    assert manifest.target == {"device": "cpu", "dtype": "fp32", "backend": "onnx", "onnx_opset": OPSET}
    first, second = (s for s in manifest.stages if s.kind == "sample")
    assert first.artifact == second.artifact == "stages/sample_3.onnx"
    assert first.constant_names == second.constant_names
    assert all(s.artifact.endswith(".onnx") for s in manifest.stages if s.artifact)
    # The graphs hold no weights: every initializer names its tensor in the plan's one weights file.
    weights = reader.tensors(WEIGHTS_MEMBER)
    for stage in (s for s in manifest.stages if s.artifact):
        graph = onnx.load_model_from_string(bytes(reader.member(stage.artifact))).graph
        assert [t.name for t in graph.initializer] == list(stage.constant_names)
        assert all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in graph.initializer)
        assert all(weights[key].shape == tuple(t.dims) for t, key in zip(graph.initializer,
                                                                          stage.constant_names.values()))
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


def test_cuda_plan_without_gpu_provider_runs_on_cpu_with_a_notice(t2i_plan, tmp_path, capsys, models_dir,
                                                                  input_dir):
    cuda_plan = _retarget(t2i_plan, tmp_path / "cuda.plan", device="cuda")
    plan = load_plan(cuda_plan)
    assert "notice: the plan targets cuda" in capsys.readouterr().err
    assert plan.providers == [CPU] and plan.device.type == "cpu"
    _parity(txt2img(), plan, tmp_path, models_dir, input_dir)


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
                                constant_names=list(stage.constant_names))
    writer.add_constants(reader.tensors(CONSTANTS_MEMBER))
    stages = [{k: v for k, v in vars(s).items() if k not in ("artifact", "constant_names")} for s in manifest.stages]
    return writer.write({"target": {**manifest.target, **target}, "workflow": manifest.workflow,
                         "inputs": [vars(i) for i in manifest.inputs], "stages": stages,
                         "folded": manifest.folded, "dropped_models": manifest.dropped_models})


def test_runtime_prompt_text_stage(compile_onnx, models_dir):
    """The ONNX text encoder on packed tokens equals the CLIP node for one and for several 77-token
    chunks (a dynamic dim), and the denoiser graph takes the longer context."""
    from kiln.compiler.lower.chains import pack_tokens
    from kiln.nodes.models.checkpoint import load_checkpoint

    plan = load_plan(compile_onnx("text", txt2img(), ["6.text"]))
    assert plan.manifest.stages[0].artifact == "stages/module_6.onnx"
    _, clip, _ = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors")
    prompts = ["a (red fox:1.3) in the snow", "a (red fox:1.3), " + ", ".join(f"tree {i}" for i in range(40))]
    for text in prompts:
        tokens = clip.tokenize(text)["l"]
        (cond,) = plan.compiled["module_6"](pack_tokens(tokens))
        torch.testing.assert_close(cond, clip.encode(text), rtol=1e-4, atol=1e-4)
    chunks = len(tokens)
    assert chunks > 1 and cond.shape[1] == chunks * 77
    uncond = plan.constants["const.7.0.0.cond"].repeat(1, chunks, 1)
    denoised, _ = plan.compiled["sample_3"](torch.randn(1, 4, 8, 8), torch.tensor([2.5]), cond, uncond,
                                            torch.tensor(7.0))
    assert denoised.shape == (1, 4, 8, 8) and torch.isfinite(denoised).all()
