"""What the AOTInductor and ONNX plan tests share: image parity against the interpreter, a
compiler writing into a per-scope artifact cache, and the runtime-prompt checks both backends must pass."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from kiln.api import run_workflow
from kiln.compiler.pipeline import compile_workflow
from kiln.kernels.settings import Settings
from kiln.runtime.errors import PlanError
from kiln.runtime.executor import run_plan
from kiln.runtime.plan import load_plan
from kiln.runtime.prompts import VOCABULARY_MEMBER

# Per precision: (minimum PSNR dB, maximum pixel difference). fp32: uint8 truncation turns a tiny
# float difference at a boundary into 1. bf16: the compiled code rounds to bf16 after fused
# elementwise chains where eager torch rounds after every op (measured 37 dB, max 21 on txt2img).
PARITY = {"fp32": (60.0, 2), "bf16": (30.0, 40)}
# Both backends, AOTInductor's compile (minutes on 2 cores) marked slow: the default suite checks a
# feature on ONNX, CI (`--runslow`) on both.
BACKENDS = [pytest.param("aoti", marks=pytest.mark.slow, id="aoti"), "onnx"]
# Two 77-token chunks with weights, against the one-chunk negative prompt: the runtime repeats it.
LONG_PROMPT = "a (red fox:1.3) in the snow, ((detailed)), " + ", ".join(f"tree {i}" for i in range(40))


def plan_compiler(folder, models_dir, input_dir, backend: str, cache):
    """``build(name, workflow, inputs=(), dtype="fp32", weights="fp32") -> plan path``, compiled into ``folder``
    with compiled artifacts cached in ``cache`` (shared by the plans of a scope)."""
    settings = Settings(cache_dir=cache)

    def build(name: str, workflow: dict, inputs=(), dtype: str = "fp32", weights: str = "fp32"):
        return compile_workflow(workflow, models=models_dir, input_dir=input_dir, inputs=inputs, backend=backend,
                                dtype=dtype, output=folder / f"{name}.plan", settings=settings, weights=weights)
    return build


def backend_compilers(models_dir, input_dir, tmp_path_factory, name: str) -> dict:
    """``{"aoti": build, "onnx": build}`` (``plan_compiler``s) for a module's plans, sharing one cache."""
    folder, cache = tmp_path_factory.mktemp(f"{name}-plans"), tmp_path_factory.mktemp(f"{name}-cache")
    return {backend: plan_compiler(folder / backend, models_dir, input_dir, backend, cache)
            for backend in ("aoti", "onnx")}


def compiled_files(cache) -> set[str]:
    folder = cache / "compiled"
    return set(os.listdir(folder)) if folder.is_dir() else set()


def _pixels(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in paths])


def measure(workflow, plan, tmp_path, models_dir, input_dir, values=None, dtype="fp32",
            lora_dirs=()) -> tuple[float, float]:
    """(PSNR in dB, max pixel difference) of the plan's images against the interpreter's at the
    plan's precision, for the same runtime input values (given to the interpreter as overrides)."""
    overrides = {tuple(k.split(".", 1)): v for k, v in (values or {}).items()}
    ref = run_workflow(workflow, models=models_dir, input_dir=input_dir, output_dir=tmp_path / "interp",
                       overrides=overrides, dtype=dtype)
    loaded = load_plan(plan) if isinstance(plan, (str, os.PathLike)) else plan
    got = run_plan(loaded, values or {}, output_dir=tmp_path / "plan", lora_dirs=lora_dirs, input_dir=input_dir)
    assert [os.path.basename(p) for p in got.saved] == [os.path.basename(p) for p in ref.saved]
    a, b = _pixels(ref.saved), _pixels(got.saved)
    assert a.shape == b.shape
    mse = float(((a - b) ** 2).mean())
    return (float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)), float(np.abs(a - b).max())


def assert_parity(workflow, plan, tmp_path, models_dir, input_dir, values=None, dtype="fp32",
                  lora_dirs=()) -> None:
    """The plan's images against the interpreter's within the precision's PARITY bounds.
    With KILN_PARITY_LOG set, each measurement is appended there (figures for notes)."""
    psnr, max_diff = measure(workflow, plan, tmp_path, models_dir, input_dir, values, dtype, lora_dirs)
    if os.environ.get("KILN_PARITY_LOG"):
        with open(os.environ["KILN_PARITY_LOG"], "a") as log:
            log.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{psnr:.1f} dB\t"
                      f"max diff {max_diff:g}\n")
    min_psnr, max_pixel_diff = PARITY[dtype]
    assert psnr >= min_psnr, f"PSNR {psnr:.1f} dB"
    assert max_diff <= max_pixel_diff, f"max pixel difference {max_diff}"


def check_runtime_prompt(workflow, plan_path, tmp_path, models_dir, input_dir) -> None:
    """A plan compiled with ``--input 6.text``: its tokenize stage and vocabulary member, images
    equal to the interpreter's for the default and for a weighted two-chunk prompt, and clear
    refusals of prompts it cannot take."""
    plan = load_plan(plan_path)
    assert [s.kind for s in plan.manifest.stages][:3] == ["tokenize", "module", "sample"]
    assert VOCABULARY_MEMBER in plan.manifest.members
    for index, values in enumerate(({"3.seed": 5}, {"6.text": LONG_PROMPT, "3.seed": 6})):
        assert_parity(workflow, plan, tmp_path / str(index), models_dir, input_dir, values)
    with pytest.raises(PlanError, match=r"6\.text.*longer than the plan's text stage.*at most 32 chunks"):
        run_plan(plan, {"6.text": "cat " * 75 * 33}, output_dir=tmp_path / "long")
    with pytest.raises(PlanError, match=r"6\.text.*textual-inversion embeddings.*embedding:style"):
        run_plan(plan, {"6.text": "a embedding:style cat"}, output_dir=tmp_path / "embedding")
    assert not (tmp_path / "long").exists() and not (tmp_path / "embedding").exists()   # nothing written
