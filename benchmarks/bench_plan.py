"""Compiled plans (AOTInductor and ONNX backends) vs the eager interpreter on CPU: warm per-image
latency, time to first image in a fresh process (split into imports, load and first run, the load
and first run stage by stage) and its peak memory, compile time and plan size.
Each engine runs in a child process of its own (a full-size interpreter and two plans do not fit
in one process's memory next to each other), children interleaved round by round (interpreter,
aoti, onnx, interpreter, ...) so machine load hits all alike; ratios are engine / interpreter
(lower is better).

Configurations: the tiny fixtures (txt2img 64², the HiRes-fix demo) and full-size architectures
with random weights: SD1.5 txt2img at 64² and 256², at 64² with the prompt a runtime input (the
plan then tokenizes and runs the text encoder every image), HiRes fix at 64² (RealESRGAN x4plus
layout, x4 then x0.5, second pass at denoise 0.5), and SDXL txt2img + HiRes fix at 64² on the
interpreter only (its memory). A backend ``onnx:fp16`` is an ONNX plan with ``--weights fp16``.
Compile time per stage (export + AOTInductor or ONNX export, or a cache hit, and onnxruntime's
optimization of each ONNX graph) is recorded too; the compile cache is a private folder under
``--workdir`` unless ``--shared-cache``.

Usage: ``python benchmarks/bench_plan.py [--configs tiny-t2i-64,sd15-t2i-256] [--backends aoti,onnx]
[--reps 3] [--warm-runs 2] [--steps 8] [--results bench_plan]``.
Writes ``benchmarks/results/<results>.json`` and ``<results>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FULL_CKPT = "sd15-arch-random.safetensors"
SDXL_CKPT = "sdxl-arch-random.safetensors"
FULL_ESRGAN = "realesrgan-x4plus-arch-random.safetensors"


def txt2img(ckpt: str, size: int, steps: int) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 7, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
    }


def hires(ckpt: str, upscaler: str, size: int, steps: int) -> dict:
    """The demo's HiRes fix (x4 ESRGAN, x0.5, second pass at denoise 0.5) at ``size`` with other models."""
    from kiln.demo import example_workflow

    workflow = example_workflow()
    workflow["4"]["inputs"]["ckpt_name"] = ckpt
    workflow["5"]["inputs"].update(width=size, height=size)
    for node in workflow.values():
        if node["class_type"] == "UpscaleModelLoader":
            node["inputs"]["model_name"] = upscaler
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
    return workflow


def configs(steps: int) -> dict[str, dict]:
    from kiln.demo import example_workflow

    return {"tiny-t2i-64": txt2img("tiny-sd15.safetensors", 64, steps),
            "tiny-hires-128-256": example_workflow(),
            "sd15-t2i-64": txt2img(FULL_CKPT, 64, steps),
            "sd15-t2i-256": txt2img(FULL_CKPT, 256, steps),
            "sd15-t2i-64-prompt": txt2img(FULL_CKPT, 64, steps),
            "sd15-hires-64": hires(FULL_CKPT, FULL_ESRGAN, 64, steps),
            "sdxl-hires-64": hires(SDXL_CKPT, FULL_ESRGAN, 64, steps)}


# Configurations compiled with runtime inputs (``kiln compile --input``).
RUNTIME_INPUTS = {"sd15-t2i-64-prompt": ("6.text",)}
# Configurations measured on the interpreter only (what its memory does).
INTERPRETER_ONLY = {"sdxl-hires-64"}


def write_models(models: Path, names: list[str]) -> None:
    from kiln.demo import write_demo_models
    from kiln.nodes.models.synthetic import write_checkpoint
    from kiln.nodes.models.synthetic_esrgan import write_esrgan

    write_demo_models(models)
    wanted = {FULL_CKPT: any(n.startswith("sd15") for n in names), SDXL_CKPT: any(n.startswith("sdxl") for n in names)}
    for name, arch in ((FULL_CKPT, "sd1"), (SDXL_CKPT, "sdxl")):
        if wanted[name] and not (models / "checkpoints" / name).exists():
            write_checkpoint(models / "checkpoints" / name, arch, size="full", seed=0)
    upscaler = models / "upscale_models" / FULL_ESRGAN
    if any("hires-64" in n for n in names) and not upscaler.exists():
        write_esrgan(upscaler, scale=4, num_feat=64, num_block=23, seed=0)   # RealESRGAN_x4plus's layout


def compile_plan(workflow: dict, models: Path, output: Path, cache: Path, backend: str,
                 inputs: tuple[str, ...] = ()) -> list[dict]:
    """Compile, timing each stage's export + build; a stage that added no cache file was a hit.
    ``backend``: ``aoti``, ``onnx`` or ``onnx:fp16`` (weights stored as fp16)."""
    from kiln.compiler.lower.lower import lower
    from kiln.compiler.pipeline import run_passes
    from kiln.compiler.stages import Compilation, CompileOptions
    from kiln.compiler.workflow import parse_workflow
    from kiln.kernels.settings import Settings
    from kiln.nodes.folders import ModelFolders

    backend, _, weights = backend.partition(":")
    options = CompileOptions(models=ModelFolders.from_models_dir(models), backend=backend, inputs=inputs,
                             settings=Settings(cache_dir=cache), weights=weights or None)
    start = time.perf_counter()
    program = run_passes(Compilation(parse_workflow(workflow), options)).program()
    stages = [{"stage": "passes (validate, fold, ...)", "seconds": time.perf_counter() - start, "cached": None}]
    compiled = lambda: set(os.listdir(cache / "compiled")) if (cache / "compiled").is_dir() else set()  # noqa: E731
    state = {"name": None, "start": 0.0, "files": compiled()}

    def progress(name: str, index: int, total: int) -> None:
        now = time.perf_counter()
        if state["name"] is not None:
            files = compiled()
            optimizing = state["name"].endswith(" onnxruntime")   # no artifact of its own to cache
            stages.append({"stage": state["name"], "seconds": now - state["start"],
                           "cached": None if optimizing else files == state["files"]})
            state["files"] = files
        state.update(name=name, start=now)

    lower(program, output, cache, progress)
    stages.append({"stage": "write plan", "seconds": time.perf_counter() - state["start"], "cached": None})
    return stages


class Interpreter:
    """The eager interpreter. Its models load during its first run, which frees each once no later
    node reads it, as ``kiln run`` does; ``keep_models()`` then holds them for the warm runs."""

    def __init__(self, workflow: dict, models: Path, output: Path):
        from kiln.compiler.validate import validate
        from kiln.compiler.workflow import parse_workflow
        from kiln.nodes.folders import ModelFolders
        from kiln.nodes.registry import RunContext

        folders = ModelFolders.from_models_dir(models)
        self.graph = validate(parse_workflow(workflow), folders, None)
        self.ctx = RunContext(models=folders, output_dir=str(output), prompt=workflow)
        self.load_stages: list[tuple[str, float]] = []
        output.mkdir(parents=True, exist_ok=True)

    def __call__(self) -> tuple[str, list[tuple[str, float]]]:
        from kiln.compiler.interpreter import run_graph

        result = run_graph(self.graph, self.ctx)
        return result.saved[-1], [(f"{t.node_id} {t.class_type}", t.seconds) for t in result.timings]

    def keep_models(self) -> None:
        """Load the models again and hold them, so the following runs are warm."""
        self.ctx.keep_models = True
        self()


class Plan:
    """A plan loaded as ``kiln run`` loads it (one image: ONNX sessions without prepacking);
    ``keep_models()`` reloads it as ``kiln serve`` does, for the warm runs."""

    def __init__(self, path: Path, output: Path, prepack: bool = False):
        from kiln.kernels.settings import Settings
        from kiln.runtime.plan import load_plan

        self.path = path
        self.settings = Settings.from_environment()   # a child process: KILN_CACHE_DIR from the parent
        marks = []
        self.plan = load_plan(path, settings=self.settings, prepack=prepack,
                              progress=lambda name, index, total: marks.append((name, time.perf_counter())))
        end = time.perf_counter()
        verify = marks[0][1] - (end - self.plan.load_seconds) if marks else self.plan.load_seconds
        self.load_stages = [("verify, map, constants", verify)] + [
            (name, (marks[i + 1][1] if i + 1 < len(marks) else end) - at) for i, (name, at) in enumerate(marks[:-1])]
        self.output = output

    def __call__(self) -> tuple[str, list[tuple[str, float]]]:
        from kiln.runtime.executor import run_plan

        run = run_plan(self.plan, {}, output_dir=self.output, settings=self.settings)
        return run.saved[-1], [(t.name, t.seconds) for t in run.timings]

    def keep_models(self) -> None:
        from kiln.runtime.plan import load_plan

        self.plan = None
        self.plan = load_plan(self.path, settings=self.settings, prepack=True)
        self()


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def psnr(path_a: str, path_b: str) -> tuple[float, int]:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path_a), dtype=np.float64)
    b = np.asarray(Image.open(path_b), dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return (float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)), int(np.abs(a - b).max())


def child(spec: dict) -> None:
    """In a fresh process: import kiln, load one engine, make the first image (each announced on
    stdout with the wall clock when it happens), then ``warm_runs`` more; report their times, the
    load and first run stage by stage, and the process's peak RSS up to its first image (VmHWM:
    getrusage's maxrss would also count the pages of the parent this process was forked from)."""
    import kiln.runtime.plan  # noqa: F401  (what ``kiln run`` imports before anything else)

    print("imported", time.time(), flush=True)
    output = Path(spec["output"])
    if spec["engine"] == "interpreter":
        run = Interpreter(json.loads(Path(spec["source"]).read_text()), Path(spec["models"]), output)
    else:
        run = Plan(Path(spec["source"]), output)
    print("loaded", time.time(), flush=True)
    image, first_stages = run()
    print("first", time.time(), image, flush=True)
    peak_kib = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    run.keep_models()
    warm = [timed(run)[0] for _ in range(spec["warm_runs"])]
    print("done", json.dumps({"warm": warm, "peak_rss_mib": peak_kib / 1024, "load_stages": run.load_stages,
                              "first_stages": first_stages}), flush=True)


def run_child(spec: dict, env: dict) -> dict:
    """``child(spec)`` in a new interpreter; adds the wall times from spawning it to kiln imported
    (``import_s``), to the engine loaded (``load_s`` after that), to its first image (``first_s``
    from spawning, ``first_run_s`` after loading), and ``image``."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-P", __file__, "--child", json.dumps(spec)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    result, marks = {}, {}
    for line in proc.stdout:
        tag, _, rest = line.rstrip("\n").partition(" ")
        if tag in ("imported", "loaded", "first"):
            stamp, _, image = rest.partition(" ")
            marks[tag] = float(stamp)
            if image:
                result["image"] = image
        elif tag == "done":
            result.update(json.loads(rest))
    if proc.wait() != 0 or "warm" not in result:
        raise RuntimeError(f"benchmark child {spec['engine']} failed (status {proc.returncode})")
    result.update(import_s=marks["imported"] - start, load_s=marks["loaded"] - marks["imported"],
                  first_run_s=marks["first"] - marks["loaded"], first_s=marks["first"] - start)
    return result


def bench(name: str, workflow: dict, work: Path, cache: Path, reps: int, warm_runs: int,
          backends: list[str]) -> list[dict]:
    """One row for the interpreter and one per backend; ``reps`` rounds of one child per engine."""
    models = work / "models"
    wf_path = work / f"{name}.json"
    wf_path.write_text(json.dumps(workflow))
    sources = {"interpreter": wf_path}
    compiles = {}
    for backend in ([] if name in INTERPRETER_ONLY else backends):
        sources[backend] = work / f"{name}.{backend.replace(':', '-')}.plan"
        compiles[backend] = compile_plan(workflow, models, sources[backend], cache, backend,
                                         RUNTIME_INPUTS.get(name, ()))
    env = {**os.environ, "KILN_CACHE_DIR": str(cache)}
    runs: dict[str, list[dict]] = {engine: [] for engine in sources}
    for _ in range(reps):
        for engine, source in sources.items():
            spec = {"engine": engine, "source": str(source), "models": str(models), "warm_runs": warm_runs,
                    "output": str(work / "out" / name / engine)}
            runs[engine].append(run_child(spec, env))

    rows = []
    for engine, results in runs.items():
        warm = [t for r in results for t in r["warm"]]
        first = [r["first_s"] for r in results]
        row = {"config": name, "engine": engine, "warm_s": statistics.median(warm), "fresh_s": statistics.median(first),
               "peak_rss_mib": max(r["peak_rss_mib"] for r in results), "samples": {"warm": warm, "fresh": first},
               **{key: statistics.median(r[key] for r in results) for key in ("import_s", "load_s", "first_run_s")},
               "load_stages": _median_stages([r["load_stages"] for r in results]),
               "first_stages": _median_stages([r["first_stages"] for r in results])}
        if engine in compiles:
            row.update(compile_s=sum(s["seconds"] for s in compiles[engine]), compile=compiles[engine],
                       plan_mib=sources[engine].stat().st_size / 2 ** 20,
                       **dict(zip(("psnr_db", "max_pixel_diff"),
                                  psnr(runs["interpreter"][0]["image"], results[0]["image"]))))
        rows.append(row)
    for row in rows:
        row["warm_ratio"] = row["warm_s"] / rows[0]["warm_s"]
        row["fresh_ratio"] = row["fresh_s"] / rows[0]["fresh_s"]
    return rows


def _median_stages(runs: list[list]) -> list[tuple[str, float]]:
    """Per stage (same order in every run), the median seconds over the runs."""
    return [(stages[0][0], statistics.median(s[1] for s in stages)) for stages in zip(*runs)]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# kiln plans vs interpreter ({meta['device']}, {meta['torch']}, onnxruntime {meta['onnxruntime']}, "
             f"{meta['threads']} threads, {meta['steps']} steps euler)", "",
             f"Medians over {meta['reps']} fresh processes per engine, {meta['warm_runs']} warm runs each after the "
             "first image. Ratios are engine / interpreter (lower is better); fresh = spawning the process to its "
             "first image written, = import (Python and kiln's runtime) + load (the plan; the interpreter validates "
             "only, its models load in its first run) + first run, each engine as `kiln run` runs it (plans: ONNX "
             "sessions without prepacking; the interpreter frees each model after its last reader); peak RSS of "
             "those processes up to their first image; warm = later images in the same process, loaded as "
             "`kiln serve` keeps them (plans: sessions with prepacking; the interpreter holds its models); "
             "compile = passes + "
             "export + build of every stage (cache hits included) + onnxruntime's optimization of ONNX graphs; "
             "PSNR and max diff of the plan's image against the interpreter's.", "",
             "| config | engine | warm s | warm ratio | fresh s | fresh ratio | import s | load s | first run s "
             "| peak RSS MiB | compile s | plan MiB | PSNR dB | max diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["config"], r["engine"], f"{r['warm_s']:.3f}", f"{r['warm_ratio']:.2f}", f"{r['fresh_s']:.2f}",
                 f"{r['fresh_ratio']:.2f}", f"{r['import_s']:.2f}", f"{r['load_s']:.2f}", f"{r['first_run_s']:.2f}",
                 f"{r['peak_rss_mib']:.0f}"]
        cells += ["", "", "", ""] if r["engine"] == "interpreter" else [
            f"{r['compile_s']:.1f}", f"{r['plan_mib']:.1f}", f"{r['psnr_db']:.1f}", str(r["max_pixel_diff"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Fresh process, stage by stage (seconds; load: verifying and mapping the plan, then each "
              "artifact's session or package; first run: each stage of the first image, or each node for the "
              "interpreter, whose first run loads the models):", "",
              "| config | engine | load | first run |", "|---|---|---|---|"]
    for r in rows:
        load = ", ".join(f"{name} {sec:.2f}" for name, sec in r["load_stages"]) or "-"
        first = ", ".join(f"{name} {sec:.2f}" for name, sec in r["first_stages"] if sec >= 0.005)
        lines.append(f"| {r['config']} | {r['engine']} | {load} | {first} |")
    lines += ["", "Compile per stage (export + AOTInductor or ONNX export; cached = artifact reused from an "
              "earlier stage or plan; `onnxruntime` = the graph optimized for the CPU provider):", "",
              "| config | backend | stage | seconds | cached |", "|---|---|---|---|---|"]
    for r in rows:
        for s in r.get("compile", []):
            cached = "" if s["cached"] is None else ("yes" if s["cached"] else "no")
            lines.append(f"| {r['config']} | {r['engine']} | {s['stage']} | {s['seconds']:.1f} | {cached} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny-t2i-64,tiny-hires-128-256,sd15-t2i-64,sd15-t2i-256,sd15-hires-64,"
                                             "sdxl-hires-64")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-bench"))
    parser.add_argument("--shared-cache", action="store_true", help="use the normal kiln cache (compiles reused)")
    parser.add_argument("--backends", default="aoti,onnx",
                        help="plan backends to compile and compare (onnx:fp16: ONNX with weights stored as fp16)")
    parser.add_argument("--warm-runs", type=int, default=2, help="warm runs per engine process, after its first")
    parser.add_argument("--results", default="bench_plan", help="results file name (without suffix)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0

    import onnxruntime
    import torch

    all_configs = configs(args.steps)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in all_configs]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {', '.join(all_configs)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    from kiln.kernels.settings import Settings

    cache = args.workdir / "cache" if not args.shared_cache else Settings.from_environment().artifact_cache

    write_models(args.workdir / "models", names)
    meta = {"device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
            "reps": args.reps, "warm_runs": args.warm_runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        for row in bench(name, all_configs[name], args.workdir, cache, args.reps, args.warm_runs,
                         args.backends.split(",")):
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("compile", "samples")}), file=sys.stderr)
        # after each configuration, so a run cut short keeps what it measured
        (RESULTS / f"{args.results}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        (RESULTS / f"{args.results}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
