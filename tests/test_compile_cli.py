"""``kiln compile``: arguments to the pipeline, progress output, and refusals with exit status 2.

Lowering (export + AOTInductor, minutes on CPU) is replaced by a recorder here; the passes and
module building around it are real, only ``kiln.compiler.lower`` is stood in for.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from kiln.cli import main
from workflows import hires_fix, txt2img


@pytest.fixture
def fake_lowering(monkeypatch):
    """Stand-ins for kiln.compiler.lower.{chains,denoiser,lower} that record what they were given."""
    calls: dict = {"chains": [], "denoisers": []}

    def build_chain(members, outputs):
        calls["chains"].append(([m.class_type for m, _, _ in members], outputs))
        return torch.nn.Identity()

    def build_denoiser(model, cfg, *, node=None, positive=None, negative=None, bound=None):
        calls["denoisers"].append((node.id, cfg, positive, negative))
        return torch.nn.Identity()

    def build_guided_denoiser(model, cfg, options, tensor_names, bound=None):
        calls["denoisers"].append(("guided", cfg, options, tensor_names))
        return torch.nn.Identity()

    def lower(program, output: Path, cache: Path, progress):
        calls["program"] = program
        for i, stage in enumerate(program.stages):
            if progress is not None:
                progress(stage.name, i, len(program.stages))
        output.write_bytes(b"plan")
        return output

    package = types.ModuleType("kiln.compiler.lower")
    package.__path__ = []
    for name, attr, fn in (("chains", "build_chain", build_chain), ("denoiser", "build_denoiser", build_denoiser),
                           ("lower", "lower", lower)):
        module = types.ModuleType(f"kiln.compiler.lower.{name}")
        setattr(module, attr, fn)
        if name == "denoiser":
            module.build_guided_denoiser = build_guided_denoiser
        setattr(package, name, module)
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(sys.modules, "kiln.compiler.lower", package)
    return calls


def write(tmp_path: Path, workflow: dict) -> Path:
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    return path


def test_compile_runs_the_passes_and_hands_the_program_to_lowering(models_dir, tmp_path, capsys, fake_lowering):
    workflow = hires_fix()
    plan = tmp_path / "hires.plan"
    rc = main(["compile", str(write(tmp_path, workflow)), "-o", str(plan), "--models", str(models_dir),
               "--input", "6.text", "--input", "5.width=64..256", "--backend", "aoti"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip() == str(plan) and plan.read_bytes() == b"plan"
    program = fake_lowering["program"]
    assert [s.name for s in program.stages] == ["tokenize_6", "module_6", "empty_latent_5", "sample_3",
                                                "module_8-11-12-13", "sample_14", "module_15-9", "save_9"]
    assert [i.name for i in program.inputs] == ["6.text", "5.width", "3.seed", "14.seed"]
    assert program.target == {"device": "cpu", "dtype": "fp32", "backend": "aoti"}
    assert program.workflow == workflow and program.dropped_models == []
    assert [f["node_id"] for f in program.folded] == ["7"] and list(program.constants) == ["const.7.0.0.cond"]
    assert all((s.module is not None) == (s.kind in ("sample", "module")) for s in program.stages)
    assert fake_lowering["chains"] == [
        (["CLIPTextEncode"], ["6.0.0.cond"]),
        (["VAEDecode", "ImageUpscaleWithModel", "ImageScaleBy", "VAEEncode"], ["13.0.samples"]),
        (["VAEDecode", "kiln.ImageToUint8"], ["9.0.value"])]
    assert fake_lowering["denoisers"] == [("3", 7.0, [{}], [{}]), ("14", 7.0, [{}], [{}])]
    for name in ("validate", "fold_constants", "fuse_stages", "build_modules"):
        assert f"kiln compile: {name} " in err
    assert "compiling save_9" in err


def test_a_runtime_cfg_builds_the_full_cfg_denoiser(models_dir, tmp_path, capsys, fake_lowering):
    rc = main(["compile", str(write(tmp_path, txt2img(cfg=1.0))), "-o", str(tmp_path / "x.plan"),
               "--models", str(models_dir), "--input", "3.cfg=1..12", "--quiet"])
    assert rc == 0 and capsys.readouterr().err == ""
    assert fake_lowering["denoisers"] == [("3", None, [{}], [{}])]
    assert fake_lowering["program"].stages[0].inputs["cfg"] == "in.3.cfg"


@pytest.mark.parametrize("args,words", [
    (["--input", "6.text=1..2"], ["error: compile_failed: compiler pass 'runtime_inputs' failed (passes run before "
                                  "it: validate, dead_nodes)", "only INT and FLOAT inputs take a range"]),
    (["--input", "8.samples"], ["node 8 (VAEDecode", "input 'samples'", "a LATENT socket"]),
    (["--dtype", "fp16"], ["fp16 inference on CPU is not supported"]),
    (["--dtype", "bf16", "--backend", "onnx"], ["ONNX backend does not take bf16", "--backend aoti for bf16"]),
    (["--device", "tpu"], ["unknown device", "expected cpu or cuda[:N]"]),
])
def test_refusals_exit_with_status_2_and_say_why(models_dir, tmp_path, capsys, fake_lowering, args, words):
    plan = tmp_path / "x.plan"
    rc = main(["compile", str(write(tmp_path, txt2img())), "-o", str(plan), "--models", str(models_dir),
               "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and not plan.exists() and "program" not in fake_lowering
    for word in words:
        assert word in err


def test_a_missing_workflow_or_model_is_reported(tmp_path, capsys, fake_lowering):
    assert main(["compile", str(tmp_path / "nope.json"), "-o", str(tmp_path / "x.plan")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compile", str(write(tmp_path, txt2img())), "-o", str(tmp_path / "x.plan"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "compiler pass 'validate' failed" in err and "tiny-sd15.safetensors" in err
