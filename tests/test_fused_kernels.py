"""The step dispatcher (kiln.kernels.fused): Triton in interpret mode vs the torch twins, kernel by
kernel and through every sampler loop (on ComfyUI's vectors), combined predictions, the modes
(``check`` included), the torch.library ops, and plans whose sample stages run the kernels.

Triton decides at decoration time whether a ``@triton.jit`` function is interpreted. Triton itself
is imported normally first (its library stays compiled-mode, as in the rest of the session); then
only kiln's kernel module is (re)imported with TRITON_INTERPRET=1, and the variable is set again
just while these tests run, so nothing else in the session runs interpreted.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import triton  # noqa: F401  (before TRITON_INTERPRET is set, see above)


def _with_interpret(fn):
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return fn()
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _interpreted_kernels():
    from triton.runtime.interpreter import InterpretedFunction

    from kiln.kernels.fused import triton_kernels
    if not isinstance(triton_kernels.euler_kernel, InterpretedFunction):
        importlib.reload(triton_kernels)


_with_interpret(_interpreted_kernels)


@pytest.fixture(autouse=True, scope="module")
def _interpret_mode():
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = saved


from kiln.kernels.cfg import Prediction, cfg_combine
from kiln.kernels.errors import KilnError
from kiln.kernels.fused import dispatch, families
from kiln.kernels.fused.dispatch import StepMismatch, check_mode
from kiln.kernels.fused.families import FAMILIES, Family, call_twin
from kiln.kernels.fused.ops import launch_triton
from kiln.kernels.ksampler import ksampler_sample
from kiln.kernels.samplers import SAMPLER_NAMES, get_sampler
from kiln.kernels.schedules import karras
from kiln.kernels.settings import Settings
from toy_denoiser import ToyDenoiser
from vectors import tensors

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4   # vectors README: fp32 samplers, noise reproduced
# ComfyUI samplers whose steps are not kernels (they step in torch, written once).
NO_STEP_KERNELS = {"heunpp2", "dpm_fast", "dpm_adaptive", "gradient_estimation", "gradient_estimation_cfg_pp",
                   "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"}
KERNEL_SAMPLERS = sorted(set(SAMPLER_NAMES) - NO_STEP_KERNELS)


class CombinedToy(ToyDenoiser):
    """A compiled plan's denoiser in miniature (kiln.runtime.kinds.sample.CompiledDenoiser): the
    prediction comes back already CFG-combined, with the uncond one beside it."""

    def predict(self, x, sigma, **kwargs):
        split = super().predict(x, sigma, **kwargs)
        return Prediction(cfg_combine(split.cond, split.uncond, split.scale), split.uncond, split.scale, combined=True)


def _count_launches(monkeypatch) -> list[str]:
    """The families of the Triton kernels launched from now on (the list fills as they run)."""
    import kiln.kernels.fused.ops as ops

    launches = []
    real_launch = ops.launch_triton
    monkeypatch.setattr(ops, "launch_triton", lambda *a, **k: launches.append(a[0].name) or real_launch(*a, **k))
    return launches


# --- every kernel vs its twin --------------------------------------------------------------------

# family -> [(optional inputs given, outputs stored, switches)]
CASES = {
    "denoised": [(("uncond", "noise"), ("den",), {}), ((), (), {})],
    "euler": [(("uncond", "y", "noise"), ("den",), {}), ((), (), {})],
    "heun": [(("uncond", "x2", "den1"), ("den",), {})],
    "multistep": [(("uncond", "h1", "h2", "h3"), ("d", "den"), {"sequential": s}) for s in (0, 1)]
    + [(("h1",), ("d",), {"sequential": 0})],
    "expint": [(("uncond", "old", "noise"), ("den",), {}), (("uncond",), (), {})],
    "sde_multistep": [(("uncond", "h1", "h2", "noise"), ("den",), {"mode": m}) for m in range(4)],
    "res": [(("uncond", "old", "noise"), ("den",), {"cfg_pp": c, "combined": k}) for c in (0, 1) for k in (0, 1)],
    "cfgpp_euler": [(("uncond", "noise"), ("den",), {"combined": 0}), (("uncond",), (), {"combined": 1})],
    "cfgpp_2s": [(("uncond", "den1", "noise"), ("den",), {"combined": 0}), (("uncond",), ("den",), {"combined": 1})],
    "cfgpp_2m": [(("uncond", "old"), ("den",), {"combined": 1}), (("uncond",), (), {"combined": 0})],
    "ddpm": [(("uncond", "noise"), ("den",), {"rescale": 1}), (("uncond",), (), {"rescale": 0})],
    "er_sde": [(("uncond", "old", "old_d", "noise"), ("den", "den_d"), {"stage": s}) for s in (1, 2, 3)],
    "unipc": [(("uncond", "xin", "m0", "m1", "m2"), (), {"nc": nc, "np": np_, "final": f})
              for nc, np_, f in ((-1, 0, 0), (0, 1, 0), (1, 2, 0), (2, 1, 1), (-1, -1, 0))],
}
KERNEL_CASES = [(family, i) for family, cases in CASES.items() for i in range(len(cases))]
SHAPES = [(1, 4, 7, 9), (3, 4, 13, 5)]
# (x dtype, model-output dtype): fp32 sampler state with half-precision UNet outputs is the common case
DTYPES = {"fp32": (torch.float32, torch.float32), "fp16": (torch.float16, torch.float16),
          "bf16": (torch.bfloat16, torch.bfloat16), "fp32+bf16": (torch.float32, torch.bfloat16)}
MODEL_OUTPUTS = {"cond", "uncond"}


def test_every_family_is_covered():
    assert set(CASES) == set(FAMILIES)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("family,case", KERNEL_CASES)
def test_kernel_matches_twin(family, case, shape, dtype):
    given, store, switches = CASES[family][case]
    x_dtype, model_dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{family}{case}{shape}".encode()))
    tensors_in = {name: torch.randn(shape, generator=gen).to(model_dtype if name in MODEL_OUTPUTS else x_dtype)
                  for name in ("x", "cond") + given}
    coef = torch.rand(20, generator=gen) + 0.5   # keeps every divisor away from 0
    fam = FAMILIES[family]
    got = launch_triton(fam, coef, 3.5, tensors_in, frozenset(store), switches)
    want = call_twin(fam, coef, 3.5, tensors_in, frozenset(store), switches)
    written = fam.writes(frozenset(store), switches)
    for name, a, b in zip(fam.outputs, got, want):
        assert (a is None) == (b is None) == (name not in written), name
        if a is None:
            continue
        assert a.dtype == b.dtype == x_dtype and a.shape == torch.Size(shape)
        # same fp32 math, then one rounding to the storage dtype
        tol = 1e-5 if x_dtype == torch.float32 else torch.finfo(x_dtype).eps
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_half_inputs_are_computed_in_fp32():
    """fp16 storage, fp32 math: the fp32 result rounded once, not fp16 arithmetic.

    (fp16, since the interpreter rounds fp32 -> bf16 by truncation; GPUs round to nearest.)
    """
    gen = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(2, 4, 16, 16, generator=gen).half() for _ in range(3))
    coef = torch.tensor([0.3, -0.29, 0.0, 0.0, 0.0])
    out = launch_triton(FAMILIES["euler"], coef, 7.5, {"x": x, "cond": cond, "uncond": uncond}, frozenset(), {})[0]
    sigma, dt = coef[0], coef[1]

    def euler(x, cond, uncond):
        return x + ((x - (uncond + (cond - uncond) * 7.5)) / sigma.to(x.dtype)) * dt.to(x.dtype)
    assert torch.equal(out, euler(x.float(), cond.float(), uncond.float()).half())
    assert not torch.equal(out, euler(x, cond, uncond))


# --- whole sampler loops through the dispatcher ----------------------------------------------------

def _vector_run(name, step_mode: str, model=None, batch_extra: int = 0):
    key = f"{name}/karras10"
    sigmas = tensors("samplers")[f"sigmas/{key}"]
    noise = tensors("samplers")["input/noise_seed42_1x4x8x8"]
    if batch_extra:
        extra = torch.randn((batch_extra,) + noise.shape[1:], generator=torch.Generator().manual_seed(7))
        noise = torch.cat([noise, extra])
    x0 = noise * sigmas[0]
    model, seen = model or ToyDenoiser(), []
    out = get_sampler(name)(model, x0, sigmas.clone(), {"seed": 42, "step_mode": step_mode}, seen.append)
    return out, model.calls, seen


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_triton_and_twin_runs_of_every_sampler_are_equal_and_match_comfyui(name, monkeypatch):
    launches = _count_launches(monkeypatch)
    out, calls, seen = _vector_run(name, "triton")
    assert bool(launches) == (name not in NO_STEP_KERNELS)
    twin, twin_calls, twin_seen = _vector_run(name, "off")
    assert (out - tensors("samplers")[f"final/{name}/karras10"]).abs().max() <= TOL
    # the kernels replay the twins' float operations: bitwise equal on CPU
    assert torch.equal(out, twin)
    assert calls == twin_calls and len(seen) == len(twin_seen)
    for a, b in zip(seen, twin_seen):
        assert a["i"] == b["i"] and torch.equal(a["x"], b["x"]) and torch.equal(a["denoised"], b["denoised"])


@pytest.mark.parametrize("mode", ["off", "triton"])
@pytest.mark.parametrize("name", KERNEL_SAMPLERS)
def test_a_combined_prediction_gives_the_split_result(name, mode):
    """A plan's denoiser combines CFG itself; the kernels then use its prediction as is (CFG++
    families still read the uncond beside it), which is the same computation."""
    split, _, _ = _vector_run(name, mode)
    combined, _, _ = _vector_run(name, mode, CombinedToy())
    assert torch.equal(split, combined)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", KERNEL_SAMPLERS)
def test_short_schedules_triton_equals_twin(name, steps):
    """First-step, last-step and order-lowering branches: 1 and 3 step schedules."""
    sigmas = karras(ToyDenoiser().model_sampling, steps)
    x0 = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(steps)) * sigmas[0]
    runs = [get_sampler(name)(ToyDenoiser(), x0, sigmas.clone(), {"seed": 5, "step_mode": mode})
            for mode in ("triton", "off")]
    assert torch.equal(*runs)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "er_sde", "uni_pc", "lms"])
def test_batch_of_three_triton_equals_twin(name):
    fused, _, _ = _vector_run(name, "triton", batch_extra=2)
    twin, _, _ = _vector_run(name, "off", batch_extra=2)
    assert fused.shape[0] == 3 and torch.equal(fused, twin)
    if name in ("lms", "uni_pc"):   # deterministic: item 0 is the vectors' run
        assert (fused[:1] - tensors("samplers")[f"final/{name}/karras10"]).abs().max() <= TOL


def test_cfg_one_skips_uncond_and_uses_cond():
    """cfg 1: no uncond reaches the kernel, which uses cond as the prediction (ComfyUI's shortcut)."""
    sigmas = tensors("samplers")["sigmas/dpmpp_2m/karras10"]
    x0 = tensors("samplers")["input/noise_seed42_1x4x8x8"] * sigmas[0]
    one = [get_sampler("dpmpp_2m")(ToyDenoiser(cfg=1.0), x0, sigmas, {"seed": 42, "step_mode": mode})
           for mode in ("triton", "off")]
    assert torch.equal(*one)
    assert not torch.equal(one[0], get_sampler("dpmpp_2m")(ToyDenoiser(), x0, sigmas, {"seed": 42}))


# --- the modes ------------------------------------------------------------------------------------

def test_modes_and_backends():
    x = torch.zeros(1)
    assert dispatch.backend(x) == "twin"   # auto: CPU tensors use the twin
    assert dispatch.backend(x, "off") == "twin" and dispatch.backend(x, "triton") == "triton"
    assert dispatch.backend(x, "check") == "check"
    with pytest.raises(ValueError, match="step kernel mode 'sometimes'"):
        check_mode("sometimes")
    with pytest.raises(TypeError, match="missing switches"):
        dispatch.step("res", torch.zeros(7), 1.0, x=x, cond=x, old=x)


def test_the_environment_is_read_into_settings_once():
    assert Settings.from_environment({}).step_kernels == "auto"
    for raw, mode in (("0", "off"), ("OFF", "off"), ("1", "auto"), ("triton", "triton"), ("check", "check")):
        assert Settings.from_environment({"KILN_FUSED": raw}).step_kernels == mode
    assert Settings.from_environment({"KILN_CACHE_DIR": "/c"}).artifact_cache == Path("/c")
    assert Settings.from_environment({"XDG_CACHE_HOME": "/x"}).artifact_cache == Path("/x/kiln")
    with pytest.raises(KilnError, match=r"input 'KILN_FUSED': invalid_setting.*found 'sometimes'"):
        Settings.from_environment({"KILN_FUSED": "sometimes"})


def test_check_mode_runs_kernel_and_twin_and_passes_when_they_agree(monkeypatch):
    launches = _count_launches(monkeypatch)
    checked, _, _ = _vector_run("dpmpp_2m_sde", "check")
    twin, _, _ = _vector_run("dpmpp_2m_sde", "off")
    assert launches and torch.equal(checked, twin)


def test_check_mode_fails_on_a_kernel_that_disagrees_with_its_twin(monkeypatch):
    real = FAMILIES["euler"]

    def off_by_a_little(coef, scale, x, cond, **kw):
        out, den = real.twin(coef, scale, x, cond, **kw)
        return out + 1e-3, den

    monkeypatch.setitem(families.FAMILIES, "euler", Family(**{**real.__dict__, "twin": off_by_a_little}))
    with pytest.raises(StepMismatch, match=r"fused euler: output out differs from the torch twin"):
        _vector_run("euler", "check")


# --- the torch.library ops ------------------------------------------------------------------------

def test_op_cpu_kernel_is_the_twin():
    gen = torch.Generator().manual_seed(3)
    x, cond, uncond, old = (torch.randn(2, 4, 3, 5, generator=gen) for _ in range(4))
    coef = torch.tensor([0.9, -0.2, -0.4, 1.4, 0.0, 0.0, 0.0])
    outs = torch.ops.kiln.fused_expint(coef, 2.0, x, cond, uncond, old, None, 0b10, [])
    want = call_twin(FAMILIES["expint"], coef, 2.0, {"x": x, "cond": cond, "uncond": uncond, "old": old},
                     frozenset({"den"}), {})
    assert torch.equal(outs[0], want[0]) and torch.equal(outs[1], want[1])


def test_export_keeps_the_op():
    """torch.export traces the triton_op as one node (in a fresh process without interpret mode:
    Triton's interpreter cannot trace fake tensors)."""
    code = """
import torch
from kiln.kernels.fused import ops  # registers kiln::fused_*
class Step(torch.nn.Module):
    def forward(self, x, cond, uncond, coef):
        return torch.ops.kiln.fused_euler(coef, 7.5, x, cond, uncond, None, None, 0, [])[0]
args = tuple(torch.randn(2, 4, 8, 8) for _ in range(3)) + (torch.tensor([1.0, -0.5, 0.0, 0.0, 0.0]),)
ep = torch.export.export(Step(), args)
targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
assert targets[0] == "kiln.fused_euler.default" and set(targets[1:]) == {"<built-in function getitem>"}, targets
x, c, u, coef = args
den = u + (c - u) * 7.5
assert torch.equal(ep.module()(*args), x + ((x - den) / coef[0]) * coef[1])
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# --- the kernel benchmark -------------------------------------------------------------------------

def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_says_so_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _bench().main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "GB/s" not in out


def test_benchmark_measurements_run_on_cpu_twins():
    """The benchmark's measuring code, exercised on tiny CPU tensors (twins only, no numbers reported)."""
    bench = _bench()
    rows = bench.sampler_rows(["euler", "dpmpp_2m_sde", "heunpp2", "uni_pc"], torch.device("cpu"), batch=1,
                              latent=(4, 8, 8), steps=4, repeats=1)
    assert [r["sampler"] for r in rows] == ["euler", "dpmpp_2m_sde", "uni_pc"]   # heunpp2 has no step kernels
    assert all(r["bytes_per_step"] > 0 and r["fused_ms"] > 0 and r["eager_ms"] > 0 for r in rows)
    kernels = bench.kernel_rows(torch.device("cpu"), batch=2, latent=(4, 8, 8), repeats=1, inner=1)
    assert {r["family"] for r in kernels} == set(FAMILIES)
    # euler with uncond and noise reads x, cond, uncond, noise and writes x_next: 5 tensors of 2*4*8*8 fp32
    assert next(r["bytes"] for r in kernels if r["family"] == "euler") == 5 * 2 * 4 * 8 * 8 * 4


# --- plans: the runtime's sampler loop on the kernels ---------------------------------------------

def _plan_sampling(name: str, step_mode: str, *, mask: bool = False):
    """kiln.kernels.ksampler_sample as a plan's sample stage runs it (a combined prediction)."""
    gen = torch.Generator().manual_seed(3)
    noise, latent = torch.randn(2, 4, 5, 6, generator=gen), torch.randn(2, 4, 5, 6, generator=gen)
    denoise_mask = (torch.rand(2, 4, 5, 6, generator=gen) > 0.5).float() if mask else None
    sigmas = karras(ToyDenoiser().model_sampling, 6)
    return ksampler_sample(CombinedToy(), name, sigmas, noise, latent, seed=4, denoise_mask=denoise_mask,
                           step_mode=step_mode)


@pytest.mark.parametrize("name, mask", [("euler", False), ("euler_ancestral", False), ("dpmpp_2m", False),
                                        ("dpmpp_2m_sde", False), ("uni_pc", False), ("heun", False),
                                        ("euler_cfg_pp", False), ("res_multistep_cfg_pp", False),
                                        ("euler", True), ("dpmpp_2m_cfg_pp", True)])
def test_plan_sampling_runs_the_kernels(name, mask, monkeypatch):
    """Compiled denoisers (combined predictions), CFG++ samplers and inpaint masks included."""
    launches = _count_launches(monkeypatch)
    fused = _plan_sampling(name, "triton", mask=mask)
    assert launches
    assert torch.equal(fused, _plan_sampling(name, "off", mask=mask))


@pytest.mark.parametrize("name, mode", [("dpm_adaptive", "triton"), ("euler", "off"), ("euler", "auto")])
def test_no_kernels_launch_without_step_kernels_or_on_cpu_auto(name, mode, monkeypatch):
    launches = _count_launches(monkeypatch)
    _plan_sampling(name, mode)
    assert launches == []


def test_a_plan_runs_its_sampler_stages_with_the_kernels(artifact_cache_dir, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from kiln.runtime.executor import run_plan
    from kiln.runtime.plan import load_plan
    from test_plan_format import tiny_artifacts, write_plan

    settings = Settings(cache_dir=tmp_path / "cache")
    artifacts = tiny_artifacts(artifact_cache_dir)
    plan = load_plan(write_plan(tmp_path / "x.plan", artifacts, cache=settings.cache_dir), settings=settings)
    eager = run_plan(plan, {"3.seed": 5}, output_dir=tmp_path / "eager", settings=settings).saved
    launches = _count_launches(monkeypatch)
    fused = run_plan(plan, {"3.seed": 5}, output_dir=tmp_path / "fused",
                     settings=Settings(step_kernels="triton", cache_dir=settings.cache_dir)).saved
    assert launches
    a, b = (np.asarray(Image.open(p[0]), dtype=np.int16) for p in (eager, fused))
    assert np.array_equal(a, b)
