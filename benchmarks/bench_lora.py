"""LoRA on plans: what ``kiln run x.plan --lora`` (and a runtime ``lora_name``) costs at load.

1. Tiny plans (ONNX and AOTInductor, SD1-layout txt2img with the prompts as runtime inputs):
   ``load_plan`` without and with a LoRA over every UNet and CLIP weight, and the part of it
   spent reading and applying the LoRA, median of ``--runs``.
2. Full-size SD1.5 weights (random, the real shapes): the patch itself through the runtime's
   ``lora_overrides`` for a rank-16 kohya LoRA over the attention, feed-forward and projection
   layers of the UNet and every CLIP-L layer (what style LoRAs cover), against reading the
   weights. Compiling a full-size plan is left out (minutes on this machine); stage reloading
   after a patch is measured on the tiny plans.

Usage: ``python benchmarks/bench_lora.py [--runs 5] [--results bench_lora] [--skip-full]``.
Writes ``benchmarks/results/<results>.json`` and ``<results>.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

RESULTS = Path(__file__).parent / "results"
STYLE_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def tiny(work: Path, runs: int) -> dict:
    from kiln.compiler.pipeline import compile_workflow
    from kiln.demo import write_demo_models
    from kiln.kernels.settings import Settings
    from kiln.nodes.models.synthetic import write_checkpoint
    from kiln.runtime.lora import LoraSpec
    from kiln.runtime.plan import load_plan
    from lora_files import kohya_everything, read, save
    from workflows import txt2img

    models = work / "models"
    write_demo_models(models)
    base = write_checkpoint(models / "checkpoints" / "base.safetensors", "sd1", seed=11)
    lora, _ = kohya_everything(read(base), 1.0, 1.0, torch.Generator().manual_seed(6))
    lora_path = save(lora, models / "loras" / "style.safetensors")
    settings = Settings(cache_dir=work / "cache")
    out = {}
    for backend in ("onnx", "aoti"):
        plan = compile_workflow(txt2img("base.safetensors"), models=models, inputs=["6.text", "7.text"],
                                backend=backend, output=work / f"{backend}.plan", settings=settings)
        load_plan(plan, settings=settings)   # warm the artifact cache
        plain, with_lora, patch = [], [], []
        for _ in range(runs):
            plain.append(load_plan(plan, settings=settings).load_seconds)
            loaded = load_plan(plan, settings=settings, loras=[LoraSpec(lora_path, 0.8, 0.6)])
            with_lora.append(loaded.load_seconds)
            patch.append(loaded.patch_seconds)
        out[backend] = {"load_s": statistics.median(plain), "load_with_lora_s": statistics.median(with_lora),
                        "patch_s": statistics.median(patch), "lora_tensors": len(lora)}
    return out


def full(work: Path, runs: int) -> dict:
    """The runtime's patch on full-size SD1.5 tensors, with a table made by the compiler's code."""
    from kiln.compiler.lora_targets import lora_table, patchable_groups
    from kiln.nodes.models.checkpoint import load_checkpoint
    from kiln.nodes.models.synthetic import write_checkpoint
    from kiln.runtime.lora import LoraSpec, lora_overrides
    from lora_files import factors, read, save

    path = write_checkpoint(work / "full.safetensors", "sd1", size="full", seed=3)
    start = time.perf_counter()
    model, clip, _ = load_checkpoint(path)
    read_s = time.perf_counter() - start
    groups = patchable_groups({"4": (model, clip)})
    stage_constants = {"sample_3": {f"unet.{k}": t for k, (t, _) in groups[0].weights.items()},
                       "module_6": {f"clip.{k}": t for k, (t, _) in groups[1].weights.items()}}
    table = lora_table(groups, stage_constants)
    sd, g, lora = read(path), torch.Generator().manual_seed(0), {}
    for key, weight in sd.items():
        unet = key.startswith("model.diffusion_model.") and any(f".{layer}.weight" in key for layer in STYLE_LAYERS)
        text = key.startswith("cond_stage_model.transformer.text_model.encoder.layers.") and weight.dim() == 2
        if not (unet or text):
            continue
        prefix = "lora_unet_" + key[len("model.diffusion_model."):] if unet else \
            "lora_te_" + key[len("cond_stage_model.transformer."):]
        name = prefix[:-len(".weight")].replace(".", "_")
        up, down = factors(weight.shape, 16, g)
        lora.update({name + ".lora_up.weight": up.half(), name + ".lora_down.weight": down.half(),
                     name + ".alpha": torch.tensor(16.0)})
    lora_path = save(lora, work / "style16.safetensors")
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        overrides = lora_overrides(lambda stage, fqn: stage_constants[stage].get(fqn), table,
                                   [LoraSpec(lora_path, 0.8, 0.6)])
        seconds.append(time.perf_counter() - start)
    return {"patch_s": statistics.median(seconds), "read_checkpoint_s": read_s,
            "patched_weights": sum(len(v) for v in overrides.values()),
            "lora_mb": lora_path.stat().st_size / 2 ** 20, "rank": 16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--results", default="bench_lora")
    parser.add_argument("--skip-full", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-lora-") as tmp:
        work = Path(tmp)
        report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "tiny": tiny(work, args.runs)}
        if not args.skip_full:
            report["full_sd15"] = full(work, max(1, args.runs // 2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.results}.json").write_text(json.dumps(report, indent=2))
    lines = ["# LoRA applied when a plan loads", "",
             f"`python benchmarks/bench_lora.py`, {report['threads']} threads, torch {report['torch']}.", "",
             "| plan | load | load + LoRA | of which LoRA read + patch |", "| --- | --- | --- | --- |"]
    for backend, r in report["tiny"].items():
        lines.append(f"| tiny SD1 txt2img, {backend} | {r['load_s']:.3f} s | {r['load_with_lora_s']:.3f} s "
                     f"| {r['patch_s']:.3f} s ({r['lora_tensors']} LoRA tensors) |")
    if "full_sd15" in report:
        r = report["full_sd15"]
        lines += ["", f"Full-size SD1.5 weights, rank-{r['rank']} LoRA ({r['lora_mb']:.0f} MB) over "
                  f"{r['patched_weights']} UNet attention/feed-forward and CLIP weights: read + patch "
                  f"{r['patch_s']:.2f} s (loading the checkpoint itself: {r['read_checkpoint_s']:.2f} s)."]
    (RESULTS / f"{args.results}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
