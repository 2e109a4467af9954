"""What a cell's runs are measured with: peak memory, FLOPs, the device's peak rate, time statistics."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
from typing import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

# Dense tensor-core peaks (TFLOP/s, no sparsity) by device name and dtype, from the vendors' data sheets.
_GPU_PEAKS = {"H200": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
              "H100": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
              "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0},
              "L40S": {"fp32": 91.6, "bf16": 362.0, "fp16": 362.0},
              "L4": {"fp32": 30.3, "bf16": 121.0, "fp16": 121.0},
              "RTX 4090": {"fp32": 82.6, "bf16": 165.2, "fp16": 165.2}}


class PeakMemory:
    """The peak over a span: RSS on the CPU (Linux resets its high-water mark through
    /proc/self/clear_refs), memory torch allocated on a CUDA device."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.kind = "cuda_allocated" if self.cuda else "rss"

    def reset(self) -> None:
        release_memory()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak_mib(self) -> float | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


def release_memory() -> None:
    """Hand freed memory back to the system, so the next span's peak starts from what is held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _register_cpu_attention() -> None:
    """torch's FLOP counter knows the CUDA attention kernels; scaled_dot_product_attention on the
    CPU dispatches to another one, counted by the same formula (QK^T and AV)."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    @register_flop_formula(op)
    def _flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


with contextlib.suppress(AttributeError, ValueError, RuntimeError):
    _register_cpu_attention()


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopCounterMode]:
    """Count the FLOPs of what runs inside (matrix products, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        yield counter


def peak_tflops(device: str, dtype: str, given: float | None) -> tuple[float | None, str]:
    """(the device's peak TFLOP/s at ``dtype``, where the number comes from)."""
    if given is not None:
        return given, "given with --peak-tflops"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else device
        for key, peaks in _GPU_PEAKS.items():
            if key in name:
                return peaks[dtype], f"{name}'s data sheet ({dtype}, dense); give --peak-tflops to override"
        return None, f"unknown for {name}: give --peak-tflops"
    return _cpu_peak(dtype)


def _cpu_peak(dtype: str) -> tuple[float | None, str]:
    flags, mhz = _cpuinfo()
    if mhz is None:
        return None, "unknown for this CPU: give --peak-tflops"
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = 2 * 2 * lanes   # two FMA units, multiply and add, fp32 lanes
    isa = "AVX-512" if lanes == 16 else "AVX2" if lanes == 8 else "SSE"
    if dtype == "bf16" and "avx512_bf16" in flags:
        per_cycle, isa = per_cycle * 2, "AVX-512 BF16"
    threads = torch.get_num_threads()
    value = threads * mhz / 1e6 * per_cycle
    return value, (f"estimated: {threads} threads x {mhz / 1000:.2f} GHz x {per_cycle} {dtype} FLOP/cycle "
                   f"({isa}, 2 FMA units); give --peak-tflops for your CPU's figure")


def _cpuinfo() -> tuple[set[str], float | None]:
    flags: set[str] = set()
    mhz = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "cpu MHz" and mhz is None:
                    mhz = float(value)
    except (OSError, ValueError):
        pass
    return flags, mhz


def time_stats(seconds: list[float]) -> dict[str, float]:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
            "stdev": statistics.stdev(seconds) if len(seconds) > 1 else 0.0}
