"""The ``kiln`` command line: ``kiln run workflow.json``, ``kiln demo``."""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from kiln.compiler.errors import KilnError, Problem


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KilnError as error:
        for problem in error.problems:
            print(f"error: {problem.format()}", file=sys.stderr)
        if args.debug and error.__cause__ is not None:
            traceback.print_exception(error.__cause__)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of node failures")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a ComfyUI API-format workflow with ComfyUI's numerics")
    run.add_argument("workflow", type=Path, help="workflow.json (ComfyUI API format)")
    _add_run_options(run)
    run.set_defaults(handler=_run)

    demo = sub.add_parser("demo", help="make tiny random-weight models and run the HiRes-fix example")
    demo.add_argument("--dir", type=Path, default=Path("demo"), help="where models and images go")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(handler=_demo)
    for p in (run, demo):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks of node failures")
    return parser


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


def _run(args: argparse.Namespace) -> int:
    from kiln.api import run_workflow

    result = run_workflow(args.workflow, models=args.models, extra_model_paths=args.extra_model_paths,
                          input_dir=args.input_dir, output_dir=args.output, device=args.device,
                          dtype=args.dtype, seed=args.seed, overrides=_parse_sets(args.set),
                          progress=not args.quiet)
    if not args.quiet:
        from kiln.progress import timing_summary

        print(timing_summary(result.timings), file=sys.stderr)
    for path in result.saved:
        print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kiln.demo import run_demo

    for path in run_demo(args.dir, progress=not args.quiet):
        print(path)
    return 0


def _parse_sets(items: list[str]) -> dict[tuple[str, str], object]:
    overrides: dict[tuple[str, str], object] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        node_id, dot, input_name = target.partition(".")
        if not sep or not dot or not node_id or not input_name:
            raise KilnError([Problem("invalid_prompt", "--set needs NODE.INPUT=VALUE",
                                     expected="e.g. --set 6.text='a red fox'", found=repr(item))])
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides[(node_id, input_name)] = value
    return overrides


if __name__ == "__main__":
    sys.exit(main())
