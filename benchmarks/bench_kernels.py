"""Fused Triton sampler-step kernels vs their eager twins (issue 5's kernel benchmark). Needs CUDA.

Two tables, at SD1.5 (4x64x64) and SDXL (4x128x128) latents, batch 1 and 4:

* step kernels: one ``kiln::fused_*`` launch vs the same math as eager torch (the twin), with the
  bytes the step must move (its inputs and outputs once) and the effective bandwidth as a
  fraction of the device's measured copy bandwidth;
* sampler steps: each sampler loop with its steps on the Triton kernels vs the same loop on the
  torch twins (step mode ``off``: eager torch, the CFG combine as separate ops), with a zero-cost
  model that returns fixed cond/uncond predictions, per step, host work included. Samplers without
  step kernels are left out.

Without a CUDA device it says so and exits 0: Triton kernels do not run on CPU, and no numbers
are made up. Usage: ``python benchmarks/bench_kernels.py [--samplers euler,dpmpp_2m] [--steps 20]``.
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time

import torch

from kiln.kernels.cfg import Denoiser, Prediction
from kiln.kernels.fused import dispatch
from kiln.kernels.fused.families import FAMILIES
from kiln.kernels.model_sampling import ModelSamplingDiscrete
from kiln.kernels.samplers import SAMPLER_NAMES, get_sampler, stepper
from kiln.kernels.schedules import karras

LATENTS = {"sd15 4x64x64": (4, 64, 64), "sdxl 4x128x128": (4, 128, 128)}
BATCHES = (1, 4)
CFG = 7.5
# one representative call per kernel family: (optional inputs, stored outputs, switches)
KERNEL_CASES = {
    "denoised": (("uncond", "noise"), (), {}),
    "euler": (("uncond", "noise"), (), {}),
    "heun": (("uncond", "x2", "den1"), (), {}),
    "multistep": (("uncond", "h1", "h2", "h3"), ("d",), {"sequential": 0}),
    "expint": (("uncond", "old"), ("den",), {}),
    "sde_multistep": (("uncond", "h1", "h2", "noise"), ("den",), {"mode": 3}),
    "res": (("uncond", "old", "noise"), ("den",), {"cfg_pp": 0, "combined": 0}),
    "cfgpp_euler": (("uncond", "noise"), (), {"combined": 0}),
    "cfgpp_2s": (("uncond", "den1", "noise"), (), {"combined": 0}),
    "cfgpp_2m": (("uncond", "old"), (), {"combined": 0}),
    "ddpm": (("uncond", "noise"), (), {"rescale": 1}),
    "er_sde": (("uncond", "old", "old_d", "noise"), ("den", "den_d"), {"stage": 3}),
    "unipc": (("uncond", "xin", "m0", "m1", "m2"), (), {"nc": 2, "np": 2, "final": 0}),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms (device-synchronised), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(mib * 2 ** 20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: [dst.copy_(src) for _ in range(10)], device, repeats) / 10
    return 2 * src.nbytes / (ms * 1e-3)


def _nbytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def kernel_rows(device: torch.device, batch: int, latent: tuple, repeats: int, inner: int = 50) -> list[dict]:
    """Each family's fused launch vs its twin (eager torch, same math) on one input set.

    Times are per call, from ``inner`` back-to-back calls (launch overhead included, no sync between).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for family, (given, store, switches) in KERNEL_CASES.items():
        fam = FAMILIES[family]
        inputs = {name: torch.randn((batch,) + latent, generator=gen, device=device)
                  for name in ("x", "cond") + given}
        coef = torch.rand(20, generator=gen, device=device) + 0.5
        store = frozenset(store)

        def fused():
            return dispatch.step(family, coef, CFG, store=store, **inputs, **switches)   # auto: the op on CUDA

        def twin():
            stores = {f"store_{name}": name in store for name in fam.stored}
            return fam.twin(coef, CFG, **inputs, **stores, **switches)

        moved = _nbytes(inputs.values()) + _nbytes(fused())
        rows.append({"family": family, "bytes": moved,
                     "fused_ms": time_ms(lambda: [fused() for _ in range(inner)], device, repeats) / inner,
                     "twin_ms": time_ms(lambda: [twin() for _ in range(inner)], device, repeats) / inner})
    return rows


class _Constant(Denoiser):
    """A denoiser whose predictions cost nothing: isolates the sampler's own per-step work."""

    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond
        self.model_sampling = ModelSamplingDiscrete("eps")

    def predict(self, x, sigma, **_):
        return Prediction(self.cond, self.uncond, CFG)


def sampler_rows(names, device: torch.device, batch: int, latent: tuple, steps: int, repeats: int) -> list[dict]:
    """Per sampler with step kernels: ms per step on the kernels (``auto``) and on the twins
    (``off``), and the bytes the kernels move per step."""
    gen = torch.Generator(device=device).manual_seed(0)
    cond, uncond, x0, noise = (torch.randn((batch,) + latent, generator=gen, device=device) for _ in range(4))
    sigmas = karras(ModelSamplingDiscrete("eps"), steps).to(device)
    moved = [0]
    real_step = stepper.step

    def counting_step(family, coef, scale, **kwargs):
        outs = real_step(family, coef, scale, **kwargs)
        moved[0] += _nbytes(kwargs.values()) + _nbytes(outs)
        return outs

    rows = []
    for name in names:
        sampler = get_sampler(name)
        options = {}
        if "noise_sampler" in inspect.signature(sampler).parameters:
            options["noise_sampler"] = lambda sigma, sigma_next: noise   # no Brownian tree on the host

        def run(mode: str):
            return sampler(_Constant(cond, uncond), x0, sigmas, {"seed": 0, "step_mode": mode}, **options)

        stepper.step = counting_step
        try:
            moved[0] = 0
            run("auto")
        finally:
            stepper.step = real_step
        if moved[0] == 0:   # no step kernels: nothing to compare
            continue
        rows.append({"sampler": name, "bytes_per_step": moved[0] / steps,
                     "fused_ms": time_ms(lambda: run("auto"), device, repeats) / steps,
                     "eager_ms": time_ms(lambda: run("off"), device, repeats) / steps})
    return rows


def _gbs(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samplers", default=",".join(SAMPLER_NAMES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device available. The fused Triton kernels run only on CUDA "
              "(on CPU the twins are used), so nothing was measured.")
        return 0
    if dispatch.backend(torch.zeros(1, device="cuda")) != "op":
        print("bench_kernels: Triton is not installed; nothing was measured.")
        return 0
    device = torch.device("cuda")
    names = [n for n in args.samplers.split(",") if n]
    copy_bw = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    print(f"measured copy bandwidth: {copy_bw / 1e9:.0f} GB/s (torch copy_, 256 MiB, read + write)\n")
    print("## Step kernels: one fused launch vs the eager twin (same math, separate torch ops)\n")
    print("| family | latent | batch | MB moved | fused us | fused GB/s | % copy | twin us | twin GB/s | % copy | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, latent in LATENTS.items():
        for batch in BATCHES:
            for r in kernel_rows(device, batch, latent, args.repeats):
                fb, tb = _gbs(r["bytes"], r["fused_ms"]), _gbs(r["bytes"], r["twin_ms"])
                print(f"| {r['family']} | {label} | {batch} | {r['bytes'] / 1e6:.2f} | {r['fused_ms'] * 1e3:.1f} | "
                      f"{fb:.0f} | {100 * fb * 1e9 / copy_bw:.0f}% | {r['twin_ms'] * 1e3:.1f} | {tb:.0f} | "
                      f"{100 * tb * 1e9 / copy_bw:.0f}% | {r['twin_ms'] / r['fused_ms']:.2f}x |")
    print(f"\n## Sampler steps ({args.steps} karras steps, constant model outputs, cfg {CFG}; host work included)\n")
    print("| sampler | latent | batch | MB moved/step | kernels ms/step | twins ms/step | speedup | kernels GB/s | % copy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, latent in LATENTS.items():
        for batch in BATCHES:
            for r in sampler_rows(names, device, batch, latent, args.steps, args.repeats):
                fb = _gbs(r["bytes_per_step"], r["fused_ms"])
                print(f"| {r['sampler']} | {label} | {batch} | {r['bytes_per_step'] / 1e6:.2f} | "
                      f"{r['fused_ms']:.3f} | {r['eager_ms']:.3f} | {r['eager_ms'] / r['fused_ms']:.2f}x | "
                      f"{fb:.0f} | {100 * fb * 1e9 / copy_bw:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
