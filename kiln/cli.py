"""The ``kiln`` command line: ``kiln run workflow.json|x.plan``, ``kiln compile``, ``kiln inspect x.plan``,
``kiln serve``, ``kiln bench``, ``kiln demo``.

Running or inspecting a plan imports only kiln.runtime (no kiln.compiler, kiln.nodes,
diffusers or transformers), so everything else is imported lazily. The environment is read
here and nowhere else (``KILN_FUSED``, ``KILN_CACHE_DIR``: ``kiln.kernels.settings``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from kiln.kernels.errors import KilnError, Problem
from kiln.runtime.errors import PlanError

_CLI_IMPORTED = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.opened = _open_plan_early(args)
        from kiln.kernels.settings import Settings   # imports torch

        args.settings = Settings.from_environment()
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except KilnError as error:   # a user error (any layer): every problem named, exit 2
        for problem in error.problems:
            print(f"error: {problem.format()}", file=sys.stderr)
        if args.debug and error.__cause__ is not None:
            traceback.print_exception(error.__cause__)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of node failures")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a ComfyUI workflow with ComfyUI's numerics, or a compiled plan")
    run.add_argument("workflow", type=Path, help="workflow.json (API or UI format), a ComfyUI PNG, or a .plan file")
    run.add_argument("--runs", type=int, default=1, metavar="N",
                     help="workflows: queue it N times, as ComfyUI's batch count: each seed's control_after_generate "
                          "(fixed, increment, decrement, randomize) applies between runs")
    _add_run_options(run)
    run.set_defaults(handler=_run)

    convert = sub.add_parser("convert", help="write the API form of a UI-format workflow (or of a ComfyUI PNG)")
    convert.add_argument("workflow", type=Path, help="workflow.json as the ComfyUI editor saves it, or a PNG")
    convert.add_argument("-o", "--output", type=Path, required=True, help="the API-format JSON to write")
    convert.set_defaults(handler=_convert)

    inspect = sub.add_parser("inspect", help="show a plan's target, inputs, stages, folded nodes and sizes")
    inspect.add_argument("plan", type=Path, help="a .plan file written by kiln compile")
    inspect.set_defaults(handler=_inspect)

    demo = sub.add_parser("demo", help="make tiny random-weight models and run the HiRes-fix example")
    demo.add_argument("--dir", type=Path, default=Path("demo"), help="where models and images go")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(handler=_demo)
    compile_ = sub.add_parser("compile", help="compile a workflow into a plan file for one device and precision")
    compile_.add_argument("workflow", type=Path, help="workflow.json (API or UI format) or a ComfyUI PNG")
    compile_.add_argument("-o", "--output", type=Path, required=True, help="the plan file to write")
    compile_.add_argument("--models", type=Path, help="a ComfyUI models folder (checkpoints/, vae/, ...)")
    compile_.add_argument("--extra-model-paths", type=Path, help="ComfyUI's extra_model_paths.yaml")
    compile_.add_argument("--input-dir", type=Path, help="where LoadImage finds its files (ComfyUI's input/)")
    compile_.add_argument("--device", default="cpu", help="the target: cpu or cuda[:N]")
    compile_.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    compile_.add_argument("--backend", choices=("aoti", "onnx"),
                          help="AOTInductor (.pt2) or ONNX (onnxruntime) artifacts; default: the faster one "
                               "measured for the device (README, 'Compiling plans')")
    compile_.add_argument("--weights", choices=("fp32", "fp16"), default="fp32",
                          help="fp16: store an fp32 plan's weights halved (half the file; upcast when it loads, "
                               "so it computes in fp32; README, 'Compiling plans', gives the measured fidelity)")
    compile_.add_argument("--input", action="append", default=[], metavar="NODE.INPUT[=lo..hi]",
                          help="take this widget value at run time (sampler seeds always are)")
    compile_.add_argument("--quiet", action="store_true", help="no progress output")
    compile_.set_defaults(handler=_compile)

    serve = sub.add_parser("serve", help="ComfyUI's HTTP/WebSocket API, answered from plans where they match")
    serve.add_argument("--models", type=Path, help="a ComfyUI models folder (checkpoints/, vae/, ...)")
    serve.add_argument("--extra-model-paths", type=Path, help="ComfyUI's extra_model_paths.yaml")
    serve.add_argument("--input-dir", type=Path, default=Path("input"), help="LoadImage's and the uploads' folder")
    serve.add_argument("--output-dir", type=Path, default=Path("output"),
                       help="saved images, previews (.preview/) and the history (.kiln-history.sqlite)")
    serve.add_argument("--listen", default="127.0.0.1", help="the address to listen on (default loopback only)")
    serve.add_argument("--port", type=int, default=8188)
    serve.add_argument("--plans", help="serve the plans in this folder (and add compiled ones there), or at an "
                                       "object-store URI (s3://bucket/plans, file:///shared/plans)")
    serve.add_argument("--compile", choices=("auto", "off"), default="off",
                       help="auto: compile a workflow in the background once it was submitted --compile-after times")
    serve.add_argument("--compile-after", type=int, default=3, metavar="N")
    serve.add_argument("--max-models", type=int, metavar="N", help="keep at most N models loaded (LRU)")
    serve.add_argument("--cache-mb", type=float, metavar="MB", help="keep at most MB of cached node outputs (LRU)")
    serve.add_argument("--max-upload-mb", type=float, default=100.0, metavar="MB")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route")
    serve.add_argument("--preview-method", choices=("none", "latent2rgb"), default="none",
                       help="sampler previews as binary WebSocket frames (ComfyUI's --preview-method)")
    serve.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the interpreter's)")
    serve.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    scaling = serve.add_argument_group("Ray Serve (pip install 'kiln[ray]')")
    scaling.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                         help="run the jobs on Ray Serve replicas: on a Ray cluster started for the server (no ADDRESS, "
                              "or 'local'), or on the cluster at ADDRESS ('auto' finds a running one; "
                              "'ray://host:10001')")
    scaling.add_argument("--replicas", type=int, default=1, metavar="N",
                         help="replicas (the autoscaling minimum with --max-replicas)")
    scaling.add_argument("--max-replicas", type=int, metavar="N", help="autoscale between --replicas and N")
    scaling.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="G")
    scaling.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C")
    serve.set_defaults(handler=_serve)
    bench = _bench_parser(sub)
    for p in (run, inspect, demo, compile_, serve, convert, bench):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks of node failures")
    return parser


def _bench_parser(sub) -> argparse.ArgumentParser:
    bench = sub.add_parser(
        "bench", help="sampler x scheduler x steps x precision x backend studies: image grids, plots, latency, "
                      "memory and fidelity", epilog=(
            "An axis is NAME=VALUES: NODE.INPUT or an input name one node has (--node picks the node when several "
            "do), or backend, dtype, device; VALUES a comma list, ranges lo..hi[:step], or a JSON list. Example: "
            "kiln bench wf.json --x sampler_name=euler,dpmpp_2m --y steps=8..32:8 --z scheduler=karras,normal "
            "--backend interpreter,onnx -o report/"))
    bench.add_argument("workflow", type=Path, help="workflow.json (API or UI format) or a ComfyUI PNG")
    bench.add_argument("-o", "--output", type=Path, required=True,
                       help="the report folder (index.html, results.json/csv, grids, cells/)")
    for axis, where in (("x", "the grid's columns"), ("y", "the grid's rows"), ("z", "one grid per value")):
        bench.add_argument(f"--{axis}", metavar="NAME=VALUES", help=f"an axis: {where}")
    bench.add_argument("--backend", metavar="LIST", help="interpreter, onnx, aoti (default interpreter)")
    bench.add_argument("--dtype", metavar="LIST", help="fp32, bf16, fp16 (default fp32)")
    bench.add_argument("--device", metavar="LIST", help="cpu, cuda[:N] (default cpu)")
    bench.add_argument("--node", help="the node bare input names on the axes refer to")
    bench.add_argument("--seeds", metavar="LIST", help="run every cell at each seed (e.g. 1,2,3 or 1..4)")
    bench.add_argument("--reference", metavar="NAME=VALUE,...",
                       help="what fidelity is measured against (default: the fp32 interpreter at the largest steps)")
    bench.add_argument("--repeat", type=int, default=3, metavar="N", help="timed warm runs per cell and seed (default 3)")
    bench.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs before a cell's timed ones (default 1)")
    bench.add_argument("--peak-tflops", type=float, metavar="TF",
                       help="the device's peak TFLOP/s for %% of the FLOP floor (default: estimated)")
    bench.add_argument("--output-node", metavar="ID", help="the output node whose images are compared "
                                                           "(default: the workflow's last)")
    bench.add_argument("--plans", type=Path, help="where compiled plans go (default: <report>/plans)")
    bench.add_argument("--resume", action="store_true", help="continue the study the report folder holds")
    bench.add_argument("--models", type=Path, help="a ComfyUI models folder (checkpoints/, vae/, ...)")
    bench.add_argument("--extra-model-paths", type=Path, help="ComfyUI's extra_model_paths.yaml")
    bench.add_argument("--input-dir", type=Path, help="where LoadImage finds its files (ComfyUI's input/)")
    bench.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                       help="set a widget value for the whole study")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(handler=_bench)
    return bench


def _bench(args: argparse.Namespace) -> int:
    from kiln.bench.runner import BenchOptions, run_bench

    return run_bench(BenchOptions(
        workflow=args.workflow, output=args.output, x=args.x, y=args.y, z=args.z, backend=args.backend,
        dtype=args.dtype, device=args.device, node=args.node, seeds=args.seeds, reference=args.reference,
        repeat=args.repeat, warmup=args.warmup, peak_tflops=args.peak_tflops, output_node=args.output_node,
        sets=_parse_sets(args.set), models=args.models, extra_model_paths=args.extra_model_paths,
        input_dir=args.input_dir, plans=args.plans, resume=args.resume, quiet=args.quiet, settings=args.settings))


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=Path, help="a ComfyUI models folder (checkpoints/, vae/, ...)")
    p.add_argument("--extra-model-paths", type=Path, help="ComfyUI's extra_model_paths.yaml")
    p.add_argument("--input-dir", type=Path, help="where LoadImage finds its files (ComfyUI's input/)")
    p.add_argument("-o", "--output", type=Path, default=Path("output"), help="folder for saved images")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--seed", type=int, help="override the seed of every sampler node")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override a widget value (VALUE is JSON, or a plain string)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.add_argument("--timings", action="store_true",
                   help="plans: print load time, time per stage and process-start-to-image time")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH[:CLIP_STRENGTH]]",
                   help="plans: apply a LoRA to the plan's weights as it loads (no recompilation), after the "
                        "plan's own; repeatable, applied in order")
    p.add_argument("--provider", choices=("tensorrt", "cuda", "cpu"),
                   help="ONNX plans: force this onnxruntime execution provider (default: TensorRT, then CUDA, "
                        "for a CUDA plan where available, else CPU)")
    p.epilog = ("A plan runs on the device and dtype it was compiled for; --device/--dtype apply to workflows, "
                "--provider to ONNX plans; a plan compiled with --input N.lora_name finds that LoRA in "
                "--models' loras/.")


def _run(args: argparse.Namespace) -> int:
    if _is_plan(args.workflow):
        if args.runs != 1:
            raise KilnError([Problem("invalid_option", "--runs applies to workflows", input_name="--runs",
                                     expected="a workflow file (a plan: run it again with --seed)",
                                     found=str(args.runs))])
        return _run_plan(args)
    if args.lora:
        raise KilnError([Problem("invalid_option", "--lora applies to compiled plans", input_name="--lora",
                                 expected="a LoraLoader node in the workflow (or a .plan file)",
                                 found=" ".join(args.lora))])
    import random
    from dataclasses import replace

    from kiln.api import run_workflow
    from kiln.compiler.ui_workflow import after_generate
    from kiln.compiler.workflow import load_workflow, parse_workflow
    from kiln.progress import ProgressBars, timing_summary

    if args.runs < 1:
        raise KilnError([Problem("invalid_option", "--runs needs a positive count", input_name="--runs",
                                 expected="1 or more", found=str(args.runs))])
    graph, rng = load_workflow(args.workflow), random.Random()
    for run in range(args.runs):
        if run:   # ComfyUI changes the controlled widgets after each queued prompt
            graph = replace(parse_workflow(after_generate(graph.source, rng)), editor=graph.editor)
        with ProgressBars() as bars:
            result = run_workflow(graph, models=args.models, extra_model_paths=args.extra_model_paths,
                                  input_dir=args.input_dir, output_dir=args.output, device=args.device,
                                  dtype=args.dtype, seed=args.seed, overrides=_parse_sets(args.set),
                                  progress=None if args.quiet else bars.node_step, settings=args.settings)
        if not args.quiet:
            print(timing_summary(result.timings), file=sys.stderr)
        for path in result.saved:
            print(path)
    return 0


def _compile(args: argparse.Namespace) -> int:
    from kiln.compiler.pipeline import compile_workflow
    from kiln.progress import ProgressBars

    def report_pass(name: str, seconds: float) -> None:
        print(f"kiln compile: {name} {seconds:.2f}s", file=sys.stderr)

    with ProgressBars(unit="stage") as bars:
        path = compile_workflow(args.workflow, models=args.models, extra_model_paths=args.extra_model_paths,
                                input_dir=args.input_dir, inputs=args.input, device=args.device, dtype=args.dtype,
                                backend=args.backend, output=args.output, settings=args.settings, weights=args.weights,
                                on_pass=None if args.quiet else report_pass,
                                progress=None if args.quiet else bars.stage_step)
    print(path)
    return 0


def _open_plan_early(args: argparse.Namespace):
    """``kiln run x.plan``: the plan opened and its digests being checked in a thread while torch
    and onnxruntime import (kiln.runtime.plan_file needs neither); None for anything else."""
    if args.command != "run" or not _is_plan(args.workflow) or not args.workflow.is_file():
        return None
    from kiln.runtime.plan_file import PlanFile

    opened = PlanFile(args.workflow)
    opened.start_verifying()
    return opened


def _is_plan(path: Path) -> bool:
    """A ``.plan`` name, or any file that starts as a zip (workflows are JSON)."""
    if path.suffix == ".plan":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _run_plan(args: argparse.Namespace) -> int:
    from kiln.progress import ProgressBars
    from kiln.runtime.executor import run_plan, seed_values
    from kiln.runtime.lora import LoraSpec
    from kiln.runtime.plan import load_plan

    with ProgressBars(unit="stage") as bars:
        plan = load_plan(args.opened or args.workflow, provider=args.provider, settings=args.settings,
                         loras=[LoraSpec.parse(text) for text in args.lora],
                         progress=None if args.quiet else bars.load_step, prepack=False)   # one image
    values = seed_values(plan.manifest, args.seed) if args.seed is not None else {}
    for item in args.set:
        parsed = _split_set(item)
        if parsed is None:
            raise PlanError("invalid_input", "--set needs NODE.INPUT=VALUE", expected="e.g. --set 3.seed=7",
                            found=repr(item))
        node_id, input_name, value = parsed
        spec = plan.manifest.input(f"{node_id}.{input_name}")
        if spec is not None and spec.type == "STRING" and not isinstance(value, str):
            value = item.partition("=")[2]   # a prompt that happens to parse as JSON (42, true) is text
        values[f"{node_id}.{input_name}"] = value
    with ProgressBars() as bars:
        result = run_plan(plan, values, output_dir=args.output, on_step=None if args.quiet else bars,
                          settings=args.settings, lora_dirs=[args.models / "loras"] if args.models else [],
                          input_dir=args.input_dir)
    if args.timings:
        stages = ", ".join(f"{t.name} {t.seconds:.2f}s" for t in result.timings)
        provider = f" ({plan.providers[0]})" if plan.providers else ""
        patch = f", LoRA patch {plan.patch_seconds:.2f}s" if plan.loras else ""
        print(f"load {plan.load_seconds:.2f}s{provider}{patch}; stages: {stages}; "
              f"total {sum(t.seconds for t in result.timings):.2f}s; "
              f"process start to image {_seconds_since_process_start():.2f}s", file=sys.stderr)
    for path in result.saved:
        print(path)
    return 0


def _seconds_since_process_start() -> float:
    """Linux: from the process start time in /proc (10 ms ticks since boot, the CLOCK_BOOTTIME
    base); elsewhere: since this module was imported, which misses interpreter start-up."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _CLI_IMPORTED


def _serve(args: argparse.Namespace) -> int:
    from kiln.server.serve import RayOptions, ServeOptions, serve

    ray = None
    if args.ray is not None:
        if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
            raise KilnError([Problem("replicas", "replicas must be at least 1, --max-replicas at least --replicas",
                                     input_name="--replicas", found=f"{args.replicas}..{args.max_replicas}")])
        ray = RayOptions(args.ray, args.replicas, args.max_replicas,
                         args.gpus_per_replica, args.cpus_per_replica)
    elif args.max_replicas is not None or args.replicas != 1 or args.gpus_per_replica:
        raise KilnError([Problem("ray_options", "--replicas, --max-replicas and --gpus-per-replica need --ray",
                                 input_name="--ray")])
    return serve(ServeOptions(
        models=args.models, input_dir=args.input_dir, output_dir=args.output_dir,
        extra_model_paths=args.extra_model_paths, listen=args.listen, port=args.port, plans=args.plans,
        compile=args.compile, compile_after=args.compile_after, max_models=args.max_models, cache_mb=args.cache_mb,
        max_upload_mb=args.max_upload_mb, api_key=args.api_key, preview_method=args.preview_method,
        device=args.device, dtype=args.dtype, settings=args.settings), ray)


def _convert(args: argparse.Namespace) -> int:
    """The API prompt of the file (nodes kiln does not know are errors: their widgets cannot be named)."""
    from kiln.compiler.validate import node_defs
    from kiln.compiler.workflow import load_workflow
    from kiln.runtime.files import atomic_file

    graph = load_workflow(args.workflow)
    problems: list[Problem] = []
    node_defs(graph, problems)
    if problems:
        raise KilnError(problems)
    with atomic_file(args.output) as f:
        f.write(json.dumps(graph.source, indent=2).encode() + b"\n")
    print(args.output)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from kiln.runtime.plan import describe_plan

    print(describe_plan(args.plan))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kiln.demo import run_demo

    for path in run_demo(args.dir, progress=not args.quiet):
        print(path)
    return 0


def _parse_sets(items: list[str]) -> dict[tuple[str, str], object]:
    overrides: dict[tuple[str, str], object] = {}
    for item in items:
        parsed = _split_set(item)
        if parsed is None:
            raise KilnError([Problem("invalid_prompt", "--set needs NODE.INPUT=VALUE",
                                     expected="e.g. --set 6.text='a red fox'", found=repr(item))])
        node_id, input_name, value = parsed
        overrides[(node_id, input_name)] = value
    return overrides


def _split_set(item: str) -> tuple[str, str, object] | None:
    """``NODE.INPUT=VALUE`` -> (node, input, value); VALUE is JSON, or else the plain string."""
    target, sep, raw = item.partition("=")
    node_id, dot, input_name = target.partition(".")
    if not sep or not dot or not node_id or not input_name:
        return None
    try:
        return node_id, input_name, json.loads(raw)
    except json.JSONDecodeError:
        return node_id, input_name, raw


if __name__ == "__main__":
    sys.exit(main())
