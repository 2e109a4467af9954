"""Fused sampler-step kernels (kiln.kernels.fused): Triton in interpret mode vs the torch twins,
fused sampler loops vs the eager samplers and ComfyUI's vectors, the switch, the torch.library ops.

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


from kiln.kernels.cfg import skips_uncond
from kiln.kernels.fused import dispatch
from kiln.kernels.fused.loop import Stepper, fusable_options
from kiln.kernels.fused.ops import FAMILIES, call_twin, launch_triton
from kiln.kernels.fused.samplers import FUSED_SAMPLER_NAMES, get_fused_sampler
from kiln.kernels.samplers import SAMPLER_NAMES, get_sampler
from kiln.kernels.schedules import karras
from toy_denoiser import ToyDenoiser
from vectors import tensors

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4   # vectors README: fp32 samplers, noise reproduced


class SplitToy:
    """The vectors' toy model as a split denoiser: cond/uncond read through a post-CFG hook."""

    def __init__(self, cfg: float = 2.0):
        self.toy = ToyDenoiser(cfg)
        self.cfg = cfg
        self.model_sampling = self.toy.model_sampling

    @property
    def calls(self) -> int:
        return self.toy.calls

    def predict(self, x, sigma, model_options=None, seed=None, **_):
        seen = {}

        def hook(args):
            seen.update(cond=args["cond_denoised"], uncond=args["uncond_denoised"])
            return args["denoised"]

        self.toy(x, sigma, model_options={**(model_options or {}), "sampler_post_cfg_function": [hook]})
        return seen["cond"], None if skips_uncond(self.cfg, model_options or {}) else seen["uncond"]


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
    "res": [(("uncond", "old", "noise"), ("den",), {"cfg_pp": c}) for c in (0, 1)],
    "cfgpp_euler": [(("uncond", "noise"), ("den",), {}), (("uncond",), (), {})],
    "cfgpp_2s": [(("uncond", "den1", "noise"), ("den",), {}), (("uncond",), ("den",), {})],
    "cfgpp_2m": [(("uncond", "old"), ("den",), {}), (("uncond",), (), {})],
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


# --- whole sampler runs on ComfyUI's vectors -----------------------------------------------------

def _vector_run(name, fused: bool, batch_extra: int = 0):
    key = f"{name}/karras10"
    sigmas = tensors("samplers")[f"sigmas/{key}"]
    noise = tensors("samplers")["input/noise_seed42_1x4x8x8"]
    if batch_extra:
        extra = torch.randn((batch_extra,) + noise.shape[1:], generator=torch.Generator().manual_seed(7))
        noise = torch.cat([noise, extra])
    x0 = noise * sigmas[0]
    model, seen = (SplitToy() if fused else ToyDenoiser()), []
    sampler = get_fused_sampler(name) if fused else get_sampler(name)
    out = sampler(model, x0, sigmas.clone(), {"model_options": {}, "seed": 42}, seen.append)
    return out, model.calls, seen


@pytest.mark.parametrize("mode", ["twin", "triton"])
@pytest.mark.parametrize("name", sorted(FUSED_SAMPLER_NAMES))
def test_fused_sampler_matches_comfyui_and_eager(name, mode):
    with dispatch.mode("off" if mode == "twin" else "triton"):
        out, calls, seen = _vector_run(name, fused=True)
    eager, eager_calls, eager_seen = _vector_run(name, fused=False)
    assert (out - tensors("samplers")[f"final/{name}/karras10"]).abs().max() <= TOL
    # the kernels replay the eager step functions' float operations: bitwise equal on CPU
    assert torch.equal(out, eager)
    assert calls == eager_calls and len(seen) == len(eager_seen)
    for a, b in zip(seen, eager_seen):
        assert a["i"] == b["i"] and torch.equal(a["x"], b["x"]) and torch.equal(a["denoised"], b["denoised"])


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", sorted(FUSED_SAMPLER_NAMES))
def test_short_schedules_equal_eager(name, steps):
    """First-step, last-step and order-lowering branches: 1 and 3 step schedules."""
    toy = ToyDenoiser()
    sigmas = karras(toy.model_sampling, steps)
    x0 = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(steps)) * sigmas[0]
    with dispatch.mode("triton"):
        fused = get_fused_sampler(name)(SplitToy(), x0, sigmas, {"model_options": {}, "seed": 5})
    eager = get_sampler(name)(toy, x0, sigmas.clone(), {"model_options": {}, "seed": 5})
    assert torch.equal(fused, eager)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "er_sde", "uni_pc", "lms"])
def test_batch_of_three_triton_equals_twin(name):
    with dispatch.mode("triton"):
        fused, _, _ = _vector_run(name, fused=True, batch_extra=2)
    with dispatch.mode("off"):
        twin, _, _ = _vector_run(name, fused=True, batch_extra=2)
    assert fused.shape[0] == 3 and torch.equal(fused, twin)
    if name in ("lms", "uni_pc"):   # deterministic: item 0 is the vectors' run
        assert (fused[:1] - tensors("samplers")[f"final/{name}/karras10"]).abs().max() <= TOL


def test_cfg_one_skips_uncond_and_equals_cond_path():
    """cfg 1: no uncond is passed and the kernel uses cond as the prediction (ComfyUI's shortcut)."""
    sigmas = tensors("samplers")["sigmas/dpmpp_2m/karras10"]
    x0 = tensors("samplers")["input/noise_seed42_1x4x8x8"] * sigmas[0]
    model = SplitToy(cfg=1.0)
    with dispatch.mode("triton"):
        fused = get_fused_sampler("dpmpp_2m")(model, x0, sigmas, {"model_options": {}, "seed": 42})
    eager = get_sampler("dpmpp_2m")(ToyDenoiser(cfg=1.0), x0, sigmas, {"model_options": {}, "seed": 42})
    assert (fused - eager).abs().max() <= 1e-5
    assert not torch.equal(fused, get_fused_sampler("dpmpp_2m")(SplitToy(), x0, sigmas, {"seed": 42}))


def test_registry_and_unfusable_runs():
    assert FUSED_SAMPLER_NAMES <= set(SAMPLER_NAMES)
    assert get_fused_sampler("heunpp2") is None and get_fused_sampler("ddim") is get_fused_sampler("euler")
    hook = {"sampler_post_cfg_function": [lambda args: args["denoised"]]}
    assert fusable_options({}) and not fusable_options(hook)
    with pytest.raises(ValueError, match="eager sampler"):
        Stepper(SplitToy(), torch.zeros(1, 4, 2, 2), torch.tensor([1.0, 0.0]), {"model_options": hook})


# --- the switch and the torch.library ops -------------------------------------------------------

def test_mode_switch():
    x = torch.zeros(1)
    assert dispatch.get_mode() == "auto" and dispatch.backend(x) == "twin"   # CPU tensors use the twin
    with dispatch.mode("0"):
        assert dispatch.get_mode() == "off" and dispatch.backend(x) == "twin"
        with dispatch.mode("triton"):
            assert dispatch.backend(x) == "triton"
        assert dispatch.get_mode() == "off"
    assert dispatch.get_mode() == "auto"
    with pytest.raises(ValueError, match="KILN_FUSED"):
        dispatch.set_mode("sometimes")
    with pytest.raises(TypeError, match="missing switches"):
        dispatch.step("res", torch.zeros(7), 1.0, x=x, cond=x, old=x)


def test_op_cpu_kernel_is_the_twin():
    gen = torch.Generator().manual_seed(3)
    x, cond, uncond, old = (torch.randn(2, 4, 3, 5, generator=gen) for _ in range(4))
    coef = torch.tensor([0.9, -0.2, -0.4, 1.4, 0.0, 0.0, 0.0])
    outs = torch.ops.kiln.fused_expint(coef, 2.0, x, cond, uncond, old, None, 0b10, [])
    want = call_twin(FAMILIES["expint"], coef, 2.0, {"x": x, "cond": cond, "uncond": uncond, "old": old},
                     frozenset({"den"}), {})
    assert torch.equal(outs[0], want[0]) and torch.equal(outs[1], want[1])


def test_export_keeps_the_op_and_env_switch():
    """torch.export traces the triton_op as one node (in a fresh process without interpret mode:
    Triton's interpreter cannot trace fake tensors); KILN_FUSED=0 is read at import."""
    code = """
import torch
from kiln.kernels.fused import dispatch, ops  # ops registers kiln::fused_*
assert dispatch.get_mode() == "off", dispatch.get_mode()
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
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"KILN_FUSED": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_exits_cleanly_without_cuda(capsys):
    assert not torch.cuda.is_available()
    assert _bench().main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "GB/s" not in out


def test_benchmark_measurements_run_on_cpu_twins():
    """The benchmark's measuring code, exercised on tiny CPU tensors (twins only, no numbers reported)."""
    bench = _bench()
    rows = bench.sampler_rows(["euler", "dpmpp_2m_sde", "uni_pc"], torch.device("cpu"), batch=1,
                              latent=(4, 8, 8), steps=4, repeats=1)
    assert [r["sampler"] for r in rows] == ["euler", "dpmpp_2m_sde", "uni_pc"]
    assert all(r["bytes_per_step"] > 0 and r["fused_ms"] > 0 and r["eager_ms"] > 0 for r in rows)
    kernels = bench.kernel_rows(torch.device("cpu"), batch=2, latent=(4, 8, 8), repeats=1, inner=1)
    assert {r["family"] for r in kernels} == set(FAMILIES)
    # euler with uncond and noise reads x, cond, uncond, noise and writes x_next: 5 tensors of 2*4*8*8 fp32
    assert next(r["bytes"] for r in kernels if r["family"] == "euler") == 5 * 2 * 4 * 8 * 8 * 4


# --- plans: the runtime's sampler loop picks the fused kernels ------------------------------
class CombinedToy:
    """A compiled plan's denoiser in miniature (kiln.runtime.stages.CompiledDenoiser): ``predict``
    hands back the already CFG-combined prediction and no uncond."""

    combined_prediction = True

    def __init__(self):
        self.toy = ToyDenoiser()
        self.model_sampling, self.cfg = self.toy.model_sampling, self.toy.cfg

    def __call__(self, x, sigma, **kwargs):
        return self.toy(x, sigma, **kwargs)

    def predict(self, x, sigma, **kwargs):
        return self.toy(x, sigma, **kwargs), None


def _count_launches(monkeypatch) -> list[str]:
    """The families of the Triton kernels launched from now on (the list fills as they run)."""
    launches = []
    real_launch = dispatch.launch_triton
    monkeypatch.setattr(dispatch, "launch_triton", lambda *a, **k: launches.append(a[0].name) or real_launch(*a, **k))
    return launches


def _plan_sampling(name: str, monkeypatch, *, env: str | None = "triton", mode: str = "triton", mask: bool = False):
    """(samples, Triton launches) of kiln.kernels.ksampler_sample as a plan's sample stage runs it."""
    from kiln.kernels.ksampler import ksampler_sample

    if env is None:
        monkeypatch.delenv("KILN_FUSED", raising=False)
    else:
        monkeypatch.setenv("KILN_FUSED", env)
    launches = _count_launches(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    noise, latent = torch.randn(2, 4, 5, 6, generator=gen), torch.randn(2, 4, 5, 6, generator=gen)
    denoise_mask = (torch.rand(2, 4, 5, 6, generator=gen) > 0.5).float() if mask else None
    sigmas = karras(ToyDenoiser().model_sampling, 6)
    with dispatch.mode(mode):
        out = ksampler_sample(CombinedToy(), name, sigmas, noise, latent, seed=4, denoise_mask=denoise_mask)
    return out, launches


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "heun"])
def test_plan_sampling_runs_the_fused_kernels(name, monkeypatch):
    fused, launches = _plan_sampling(name, monkeypatch)
    eager, none = _plan_sampling(name, monkeypatch, env=None)
    assert launches and not none
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, case", [("euler_cfg_pp", "cfg++ needs the uncond prediction"),
                                        ("euler", "inpaint mask"), ("dpm_adaptive", "no fused loop"),
                                        ("euler", "KILN_FUSED=off")])
def test_plan_sampling_falls_back_to_eager(name, case, monkeypatch):
    mode = "off" if case == "KILN_FUSED=off" else "triton"
    _, launches = _plan_sampling(name, monkeypatch, mode=mode, mask=case == "inpaint mask")
    assert launches == []


def test_a_plan_runs_its_sampler_stages_with_the_kernels(request, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from kiln.runtime.executor import run_plan
    from kiln.runtime.plan import load_plan
    from test_plan_format import tiny_artifacts, write_plan

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    artifacts = tiny_artifacts(Path(request.config.cache.mkdir("kiln-tiny-aoti")))
    plan = load_plan(write_plan(tmp_path / "x.plan", artifacts))
    eager = run_plan(plan, {"3.seed": 5}, output_dir=tmp_path / "eager").saved
    launches = _count_launches(monkeypatch)
    monkeypatch.setenv("KILN_FUSED", "triton")
    with dispatch.mode("triton"):
        fused = run_plan(plan, {"3.seed": 5}, output_dir=tmp_path / "fused").saved
    assert launches
    a, b = (np.asarray(Image.open(p[0]), dtype=np.int16) for p in (eager, fused))
    assert np.abs(a - b).max() <= 1
