"""``kiln serve``: builds the front, the local worker pool and the plan catalogue from the command
line's choices and serves until stopped."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from kiln.compiler.node_cache import NodeCache
from kiln.kernels.errors import KilnError, Problem
from kiln.kernels.settings import Settings
from kiln.nodes.folders import ModelFolders
from kiln.nodes.registry import RunContext
from kiln.server.app import Front, FrontConfig
from kiln.server.files import PRIVATE_PREFIX
from kiln.server.plan_storage import is_uri, local_plans
from kiln.server.plans import PlanCatalog
from kiln.server.pool import LocalPool
from kiln.server.runner import Runner, RunnerConfig

log = logging.getLogger("kiln.serve")
PLANS_FOLDER = f"{PRIVATE_PREFIX}-plans"   # where --compile auto writes plans without --plans


@dataclass(frozen=True)
class RayOptions:
    """``--ray``: where the replicas run and how many."""

    address: str = "local"         # a cluster started for the server; "auto" (a running one), "ray://host:10001"
    replicas: int = 1               # fixed count, or with max_replicas the autoscaling minimum
    max_replicas: int | None = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0


@dataclass(frozen=True)
class ServeOptions:
    models: Path | None
    input_dir: Path
    output_dir: Path
    extra_model_paths: Path | None = None
    listen: str = "127.0.0.1"
    port: int = 8188
    plans: str | None = None        # a folder, or an object-store URI (s3://..., gs://..., file://...)
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


def plans_folder(options: ServeOptions) -> Path | None:
    """The local folder of the plans served: ``--plans`` (a URI's copy, fetched first), else
    ``--compile auto``'s own folder."""
    if options.plans is not None:
        if options.compile == "auto" and is_uri(options.plans):
            raise KilnError([Problem("plans_uri", "--compile auto writes plans into a folder, not an object store",
                                     input_name="--plans", found=options.plans,
                                     hint="compile with 'kiln compile' and upload the plan, or give a folder")])
        return local_plans(options.plans, options.settings)
    if options.compile == "auto":
        folder = options.output_dir / PLANS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return None


def build_catalog(options: ServeOptions, folder: Path | None) -> PlanCatalog:
    def compile_plan(prompt: dict, inputs: list[str], output: Path) -> Path:
        from kiln.compiler.pipeline import compile_workflow

        return compile_workflow(prompt, models=options.models, extra_model_paths=options.extra_model_paths,
                                input_dir=options.input_dir, inputs=inputs, device=options.device,
                                dtype=options.dtype, output=output, settings=options.settings)

    return PlanCatalog(folder, options.settings,
                       compile_after=options.compile_after if options.compile == "auto" else None,
                       compiler=compile_plan)


def model_folders(options: ServeOptions) -> ModelFolders:
    return ModelFolders.from_models_dir(options.models, options.extra_model_paths)


def build_runner(options: ServeOptions, catalog: PlanCatalog, models: ModelFolders) -> Runner:
    """A worker's side: the models, the node cache and the plans (in this process or a Ray replica)."""
    cache = NodeCache(options.max_models, int(options.cache_mb * 2 ** 20) if options.cache_mb else None)
    return Runner(RunnerConfig(models, str(options.input_dir), str(options.output_dir), options.device,
                               options.dtype, options.settings, previews=options.preview_method != "none"),
                  catalog, cache)


def build_front(options: ServeOptions, ray: RayOptions | None = None) -> Front:
    """Everything a server is made of, wired; with ``ray``, the workers are Ray Serve replicas."""
    catalog = build_catalog(options, plans_folder(options))
    models = model_folders(options)
    if ray is None:
        pool = LocalPool(build_runner(options, catalog, models))
    else:
        from kiln.server.ray_pool import RayPool

        pool = RayPool.start(options, ray, catalog)
    context = RunContext(models=models, input_dir=str(options.input_dir))
    return Front(FrontConfig(options.output_dir, options.input_dir, options.max_upload_mb, options.api_key),
                 context, pool, catalog)


def serve(options: ServeOptions, ray: RayOptions | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if options.listen not in ("127.0.0.1", "localhost", "::1"):
        print(f"kiln serve: warning: listening on {options.listen} makes the server reachable from other "
              "machines" + ("" if options.api_key else "; anyone who can reach it can run prompts (see --api-key)"),
              file=sys.stderr)
    front = build_front(options, ray)
    print(f"kiln serve: http://{options.listen}:{options.port} (plans: {len(front.plans.listing())}, "
          f"compile {options.compile})", file=sys.stderr, flush=True)
    web.run_app(front.app(), host=options.listen, port=options.port, print=None, handle_signals=True, access_log=None)
    return 0
