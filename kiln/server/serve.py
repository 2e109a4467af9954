"""``kiln serve``: builds the front, the local worker pool and the plan catalogue from the command
line's choices and serves until stopped."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from kiln.compiler.node_cache import NodeCache
from kiln.kernels.settings import Settings
from kiln.nodes.folders import ModelFolders
from kiln.nodes.registry import RunContext
from kiln.server.app import Front, FrontConfig
from kiln.server.files import PRIVATE_PREFIX
from kiln.server.plans import PlanCatalog
from kiln.server.pool import LocalPool
from kiln.server.runner import Runner, RunnerConfig

log = logging.getLogger("kiln.serve")
PLANS_FOLDER = f"{PRIVATE_PREFIX}-plans"   # where --compile auto writes plans without --plans


@dataclass(frozen=True)
class ServeOptions:
    models: Path | None
    input_dir: Path
    output_dir: Path
    extra_model_paths: Path | None = None
    listen: str = "127.0.0.1"
    port: int = 8188
    plans: Path | None = None
    compile: str = "off"            # auto | off
    compile_after: int = 3
    max_models: int | None = None
    cache_mb: float | None = None
    max_upload_mb: float = 100.0
    api_key: str | None = None
    preview_method: str = "none"
    device: str = "cpu"
    dtype: str = "fp32"
    settings: Settings = Settings()


def build_front(options: ServeOptions) -> Front:
    """Everything a server is made of, wired; nothing started yet."""
    models = ModelFolders.from_models_dir(options.models, options.extra_model_paths)
    plans_dir = options.plans
    if plans_dir is None and options.compile == "auto":
        plans_dir = options.output_dir / PLANS_FOLDER
    if plans_dir is not None:
        plans_dir.mkdir(parents=True, exist_ok=True)

    def compile_plan(prompt: dict, inputs: list[str], output: Path) -> Path:
        from kiln.compiler.pipeline import compile_workflow

        return compile_workflow(prompt, models=options.models, extra_model_paths=options.extra_model_paths,
                                input_dir=options.input_dir, inputs=inputs, device=options.device,
                                dtype=options.dtype, output=output, settings=options.settings)

    catalog = PlanCatalog(plans_dir, options.settings,
                          compile_after=options.compile_after if options.compile == "auto" else None,
                          compiler=compile_plan)
    cache = NodeCache(options.max_models, int(options.cache_mb * 2 ** 20) if options.cache_mb else None)
    runner = Runner(RunnerConfig(models, str(options.input_dir), str(options.output_dir), options.device,
                                 options.dtype, options.settings, previews=options.preview_method != "none"),
                    catalog, cache)
    context = RunContext(models=models, input_dir=str(options.input_dir))
    return Front(FrontConfig(options.output_dir, options.input_dir, options.max_upload_mb, options.api_key),
                 context, LocalPool(runner), catalog)


def serve(options: ServeOptions) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if options.listen not in ("127.0.0.1", "localhost", "::1"):
        print(f"kiln serve: warning: listening on {options.listen} makes the server reachable from other "
              "machines" + ("" if options.api_key else "; anyone who can reach it can run prompts (see --api-key)"),
              file=sys.stderr)
    front = build_front(options)
    print(f"kiln serve: http://{options.listen}:{options.port} (plans: {len(front.plans.listing())}, "
          f"compile {options.compile})", file=sys.stderr, flush=True)
    web.run_app(front.app(), host=options.listen, port=options.port, print=None, handle_signals=True, access_log=None)
    return 0
