"""``kiln bench`` end to end on the tiny fixtures: a 2x2x2 study (sampler x steps x backend, the
interpreter and an ONNX plan), its files, every cell's image against ``kiln run`` of the cell,
fidelity, the report in a real headless browser, Ctrl-C and --resume, and refusals before
anything runs."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import browser_page
from kiln.cli import main
from plan_parity import PARITY
from workflows import hires_fix, txt2img

SAMPLERS, STEPS, BACKENDS = ("euler", "heun"), (2, 4), ("interpreter", "onnx")


@pytest.fixture(scope="module")
def workflow_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench-workflow") / "t2i.json"
    path.write_text(json.dumps(txt2img()))
    return path


@pytest.fixture(scope="module")
def study(workflow_file, models_dir, compiled_cache, tmp_path_factory) -> Path:
    """The report folder of the 2x2x2 study."""
    report = tmp_path_factory.mktemp("bench") / "report"
    env = {"KILN_CACHE_DIR": str(compiled_cache)}
    code = _bench(workflow_file, models_dir, report, env, "--x", f"sampler_name={','.join(SAMPLERS)}",
                  "--y", f"steps={','.join(map(str, STEPS))}", "--z", f"backend={','.join(BACKENDS)}",
                  "--repeat", "2")
    assert code == 0
    return report


def _bench(workflow: Path, models: Path, report: Path, env: dict, *args: str) -> int:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return main(["bench", str(workflow), "--models", str(models), "-o", str(report), "--quiet", *args])


def _results(report: Path) -> dict:
    from kiln.bench.results import load

    return load(report / "results.json")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_the_study_writes_every_file(study):
    names = {f"sampler_name={s},steps={n},backend={b}" for s in SAMPLERS for n in STEPS for b in BACKENDS}
    assert {p.stem for p in (study / "cells").glob("*.png")} == names
    for name in ("index.html", "results.json", "results.csv", "grid_interpreter.png", "grid_onnx.png"):
        assert (study / name).is_file(), name
    assert len(list((study / "plans").glob("*.plan"))) == 1   # one plan serves every onnx cell
    results = _results(study)
    assert {c["name"] for c in results["cells"]} == names and all(c["status"] == "done" for c in results["cells"])
    rows = (study / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(names)
    assert not (study / ".work").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (study / "results.json", study / "results.csv", next((study / "cells").glob("*.png"))):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask   # as any program's files: others may read


def test_measures_of_every_cell(study):
    for cell in _results(study)["cells"]:
        steps, sampler = cell["values"]["steps"], cell["values"]["sampler_name"]
        assert cell["ran_on"] == cell["values"]["backend"] and cell["fallback"] is None
        assert cell["steps"] == steps
        assert cell["model_calls"] == (steps if sampler == "euler" else 2 * steps - 1)
        times = cell["time_s"]
        assert 0 < times["min"] <= times["median"] <= times["max"]
        assert cell["ms_per_model_call"] > 0 and cell["peak_memory_mib"] > 100 and cell["memory_kind"] == "rss"
        assert cell["gflops"] > 0 and 0 < cell["floor_pct"] < 100
        assert (cell["compile_s"] is None) == (cell["ran_on"] == "interpreter")
        assert cell["workflow"]["3"]["inputs"]["steps"] == steps


def test_every_cell_image_is_what_kiln_run_makes_of_its_workflow(study, models_dir, tmp_path):
    (plan,) = (study / "plans").glob("*.plan")
    for cell in _results(study)["cells"]:
        image = _pixels(study / cell["image"])
        values = cell["values"]
        if cell["ran_on"] == "interpreter":   # kiln run of the cell's workflow, bit for bit
            workflow = tmp_path / f"{cell['name']}.json"
            workflow.write_text(json.dumps(cell["workflow"]))
            out = tmp_path / cell["name"]
            assert main(["run", str(workflow), "--models", str(models_dir), "-o", str(out), "--quiet"]) == 0
        else:   # the plan run with the cell's values: bit for bit
            out = tmp_path / cell["name"]
            assert main(["run", str(plan), "-o", str(out), "--quiet", "--set", f"3.steps={values['steps']}",
                         "--set", f"3.sampler_name={values['sampler_name']}"]) == 0
        (ran,) = list(out.glob("*.png"))
        assert np.array_equal(_pixels(ran), image), cell["name"]


def test_fidelity_against_itself_is_infinite(study):
    cells = {c["name"]: c for c in _results(study)["cells"]}
    for cell in cells.values():
        baseline = cell["fidelity"]["fp32_interpreter"]
        if cell["ran_on"] == "interpreter":
            assert baseline == {"psnr": math.inf, "ssim": 1.0, "latent_rmse": 0.0}
        else:   # the ONNX plan against the interpreter: the plans' parity bound
            assert PARITY["fp32"][0] <= baseline["psnr"] < math.inf and 0 < baseline["latent_rmse"] < 1e-2
        reference = cell["fidelity"]["reference"]   # the fp32 interpreter at 4 steps, same sampler
        if cell["values"]["steps"] == 4:
            assert reference == baseline
        else:
            assert reference["psnr"] < 60 and reference["ssim"] < 1 and reference["latent_rmse"] > 1e-2
    assert any(c["pareto"] for c in cells.values())


def test_the_report_opens_in_a_browser_with_its_grids(study):
    with browser_page() as (page, problems):
        page.goto((study / "index.html").as_uri())
        page.wait_for_load_state("load")
        grids = page.eval_on_selector_all("img[src^='grid']", "imgs => imgs.map(i => [i.src, i.naturalWidth])")
        assert len(grids) == 2 and all(width > 0 for _, width in grids)
        assert page.eval_on_selector_all("img", "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("svg").count() >= 3   # time vs steps, fidelity vs time, memory
        assert page.locator("map area").count() == 8
        assert problems == []


def test_ctrl_c_writes_the_report_of_finished_cells_and_resume_continues(workflow_file, models_dir, compiled_cache,
                                                                         tmp_path):
    report = tmp_path / "report"
    args = [str(workflow_file), "--models", str(models_dir), "-o", str(report), "--quiet",
            "--x", "sampler_name=euler,heun", "--y", "steps=2..12:2", "--repeat", "2"]
    env = {**os.environ, "KILN_CACHE_DIR": str(compiled_cache)}
    child = subprocess.Popen([sys.executable, "-m", "kiln.cli", "bench", *args], env=env,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if (report / "results.json").is_file() and any(c["status"] == "done" for c in _results(report)["cells"]):
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    assert child.wait(60) == 130
    stderr = child.stderr.read()
    assert "stopped" in stderr and "--resume" in stderr and "Traceback" not in stderr
    finished = {c["name"]: c for c in _results(report)["cells"]}
    assert 0 < len(finished) < 12
    assert f"stopped: {len(finished)} of 12 cells finished" in (report / "index.html").read_text()

    assert main(["bench", *args]) == 2   # the folder holds a study: refused without --resume
    assert main(["bench", *args, "--resume"]) == 0
    cells = _results(report)["cells"]
    assert len(cells) == 12 and all(c["status"] == "done" for c in cells)
    for cell in cells:   # what finished before the stop was kept, not run again
        if cell["name"] in finished:
            assert cell["time_s"] == finished[cell["name"]]["time_s"]
    assert "cells finished; <code>--resume</code>" not in (report / "index.html").read_text()


def test_a_group_no_plan_serves_runs_on_the_interpreter_and_says_so(workflow_file, models_dir, compiled_cache,
                                                                    tmp_path):
    report = tmp_path / "report"
    assert _bench(workflow_file, models_dir, report, {"KILN_CACHE_DIR": str(compiled_cache)},
                  "--backend", "onnx", "--dtype", "bf16", "--repeat", "1", "--warmup", "0") == 0
    (cell,) = _results(report)["cells"]
    assert cell["ran_on"] == "interpreter" and "bf16" in cell["fallback"]
    assert cell["fidelity"]["fp32_interpreter"]["psnr"] < math.inf   # bf16 against fp32
    assert "fallback" in (report / "index.html").read_text()


def test_seeds_are_samples_of_each_cell(workflow_file, models_dir, tmp_path):
    report = tmp_path / "report"
    assert _bench(workflow_file, models_dir, report, {}, "--seeds", "1..2", "--repeat", "1", "--warmup", "0") == 0
    (cell,) = _results(report)["cells"]
    assert cell["name"] == "workflow" and cell["seeds"] == [1, 2]
    assert cell["images"] == ["cells/workflow,seed=1.png", "cells/workflow,seed=2.png"]
    first, second = (_pixels(report / image) for image in cell["images"])
    assert not np.array_equal(first, second)
    assert cell["fidelity"]["reference"]["psnr"] == math.inf   # both seeds against their own reference
    assert (report / "grid.png").is_file()


@pytest.mark.slow
def test_an_aoti_study_serves_its_cells_from_one_plan(workflow_file, models_dir, compiled_cache, tmp_path):
    report = tmp_path / "report"
    assert _bench(workflow_file, models_dir, report, {"KILN_CACHE_DIR": str(compiled_cache)},
                  "--x", "sampler_name=euler,dpmpp_2m", "--backend", "aoti", "--repeat", "1") == 0
    cells = _results(report)["cells"]
    assert [c["ran_on"] for c in cells] == ["aoti", "aoti"] and len(list((report / "plans").glob("*.plan"))) == 1
    for cell in cells:
        assert PARITY["fp32"][0] <= cell["fidelity"]["fp32_interpreter"]["psnr"]


@pytest.mark.parametrize("args,words", [
    (["--x", "samplr=euler"], ["invalid_axis", "no node of the workflow has this widget", "did you mean 'sampler_name'"]),
    (["--x", "3.sampler=euler"], ['node 3 (KSampler "My Sampler")', "input 'sampler'", "has no widget",
                                  "sampler_name", "(--x)"]),
    (["--y", "steps=0,4"], ["node 3 (KSampler", "input 'steps'", "value_smaller_than_min", "(from --y steps)"]),
    (["--x", "sampler_name=euler,eulr"], ["node 3 (KSampler", "input 'sampler_name'", "value_not_in_list",
                                          "did you mean 'euler'?", "(from --x sampler_name)"]),
    (["--x", "cfg=5.5..7"], ["a range of non-whole numbers needs a step"]),
    (["--reference", "steps=0"], ["input 'steps'", "value_smaller_than_min", "(from --reference)"]),
    (["--output-node", "3"], ["--output-node names no output node", "one of 9"]),
    (["--z", "backend=interpreter,tensorrt"], ["unknown backend", "interpreter, onnx, aoti"]),
    (["--x", "steps=2,4", "--y", "3.steps=6"], ["one input is on two axes"]),
    (["--x", "3.positive=1"], ["node 3 (KSampler", "input 'positive'", "has no widget"]),
    (["--dtype", "fp16"], ["fp16 inference on CPU is not supported"]),
])
def test_bad_axes_are_refused_before_anything_runs(workflow_file, models_dir, tmp_path, capsys, args, words):
    report = tmp_path / "report"
    assert main(["bench", str(workflow_file), "--models", str(models_dir), "-o", str(report), *args]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in err and not report.exists()


def test_a_bare_name_two_nodes_have_needs_the_node(models_dir, tmp_path, capsys):
    workflow = tmp_path / "hires.json"
    workflow.write_text(json.dumps(hires_fix()))
    args = ["bench", str(workflow), "--models", str(models_dir), "-o", str(tmp_path / "r"), "--x", "steps=2,3"]
    assert main(args) == 2
    assert "several nodes have a 'steps' widget" in capsys.readouterr().err
