"""Running one queued prompt the way ComfyUI's ``PromptExecutor`` does, with its messages:
from a plan when one matches, else on the interpreter, reusing cached node outputs either way.
Runs on a worker thread; ``emit`` hands each message to the front."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from kiln.compiler.interpreter import RunEvents, run_graph
from kiln.compiler.node_cache import NodeCache, signatures
from kiln.kernels.errors import Interrupted, KilnError
from kiln.kernels.settings import Settings
from kiln.nodes import registry
from kiln.nodes.folders import ModelFolders
from kiln.nodes.registry import RunContext, UiOutput
from kiln.runtime.executor import run_plan
from kiln.server.plans import PlanCatalog
from kiln.server.previews import latent_preview
from kiln.server.protocol import timestamp
from kiln.server.queue import Job

log = logging.getLogger("kiln.serve")

# emit(event, data): a text message for the job's client; emit_preview(image, node_id): a binary one.
Emit = Callable[[str, dict], None]


@dataclass
class Outcome:
    """What the front records in history: ``status`` success | error | interrupted."""

    status: str
    outputs: dict[str, dict] = field(default_factory=dict)     # node id -> ui dict
    messages: list[list] = field(default_factory=list)         # [[event, data], ...]
    engine: str = "interpreter"                                # or "plan <name>", "cache"
    worker: str | None = None                                  # the Ray replica that ran it


@dataclass(frozen=True)
class RunnerConfig:
    models: ModelFolders
    input_dir: str | None
    output_dir: str
    device: str = "cpu"
    dtype: str = "fp32"
    settings: Settings = Settings()
    previews: bool = False


class Runner:
    """Executes jobs one at a time (the worker thread); the node cache persists between them."""

    def __init__(self, config: RunnerConfig, plans: PlanCatalog, cache: NodeCache):
        self.config, self.plans, self.cache = config, plans, cache
        self._lock = threading.Lock()   # one job at a time on this runner's models

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """``POST /free``: forget cached node outputs (and with them the models they hold)."""
        if unload_models or free_memory:
            with self._lock:
                self.cache.clear()

    def run(self, job: Job, emit: Emit, stop: threading.Event,
            emit_preview: Callable[[object, str], None] | None = None) -> Outcome:
        with self._lock:
            return _Execution(self, job, emit, stop, emit_preview).run()


def interrupted(job: Job, node_id: str | None, executed: list[str]) -> dict:
    """``execution_interrupted``'s data: the node that was running and those that had finished."""
    node = job.graph.nodes.get(node_id or "")
    return {"node_id": node_id, "node_type": getattr(node, "class_type", None), "executed": executed}


def execution_error(job: Job, node_id: str | None, executed: list[str], message: str, error_type: str) -> dict:
    """``execution_error``'s data, as ComfyUI shapes it (no traceback: the message says what failed)."""
    return {**interrupted(job, node_id, executed), "exception_message": message, "exception_type": error_type,
            "traceback": [], "current_inputs": {}, "current_outputs": []}


class _Execution(RunEvents):
    """One job's run and the messages it sends."""

    def __init__(self, runner: Runner, job: Job, emit: Emit, stop: threading.Event, emit_preview):
        self.runner, self.job, self._emit, self.stop = runner, job, emit, stop
        self.emit_preview = emit_preview if runner.config.previews else None
        self.outcome = Outcome("success")
        self.finished: list[str] = []
        self.current: str | None = None

    # --- messages ---------------------------------------------------------------------------
    def message(self, event: str, data: dict, history: bool = False) -> None:
        data = {**data, "prompt_id": self.job.prompt_id}
        if history:
            data["timestamp"] = timestamp()
            self.outcome.messages.append([event, data])
        self._emit(event, data)

    def cached(self, node_ids: list[str]) -> None:
        self.message("execution_cached", {"nodes": node_ids}, history=True)

    def executing(self, node_id: str) -> None:
        if self.stop.is_set():
            raise Interrupted(node_id)
        if self.current is not None:
            self.finished.append(self.current)
        self.current = node_id
        self.message("executing", {"node": node_id, "display_node": node_id})

    def executed(self, node_id: str, ui: UiOutput) -> None:
        output = {"images": [image.ui() for image in ui.images]}
        self.outcome.outputs[node_id] = output
        self.message("executed", {"node": node_id, "display_node": node_id, "output": output})

    def progress(self, node_id: str, value: int, total: int) -> None:
        if self.stop.is_set():
            raise Interrupted(node_id)
        self.message("progress", {"value": value, "max": total, "node": node_id})

    def preview(self, node_id: str, x0, scale_factor: float) -> None:
        if self.emit_preview is not None:
            image = latent_preview(x0, scale_factor)
            if image is not None:
                self.emit_preview(image, node_id)

    # --- the run ----------------------------------------------------------------------------
    def run(self) -> Outcome:
        runner, job = self.runner, self.job
        self.message("execution_start", {}, history=True)
        try:
            match = runner.plans.match(job.prompt, job.graph)
            if match is not None:
                self._run_plan(*match)
            else:
                self._run_interpreter()
            if self.current is not None:
                self.finished.append(self.current)
            self.message("execution_success", {}, history=True)
        except Interrupted:
            self.outcome.status = "interrupted"
            self.message("execution_interrupted", interrupted(self.job, self.current, self.finished), history=True)
        except Exception as error:   # noqa: BLE001 - reported to the client, the server keeps serving
            self.outcome.status = "error"
            self._error(error)
        return self.outcome

    def _error(self, error: Exception) -> None:
        problem = error.problems[0] if isinstance(error, KilnError) and error.problems else None
        node_id = (problem.node_id if problem is not None and problem.node_id else None) or self.current
        message = problem.format() if problem is not None else f"{type(error).__name__}: {error}"
        if problem is None:
            log.exception("kiln serve: prompt %s failed", self.job.prompt_id)
        self.message("execution_error", execution_error(self.job, node_id, self.finished, message,
                                                        type(error.__cause__ or error).__name__), history=True)

    def _context(self) -> RunContext:
        config = self.runner.config
        ctx = RunContext(models=config.models, input_dir=config.input_dir, output_dir=config.output_dir,
                         device=config.device, dtype=config.dtype, prompt=self.job.prompt,
                         extra_pnginfo=self.job.extra_data.get("extra_pnginfo"), settings=config.settings)
        ctx.progress = lambda step, total: self.progress(ctx.node_id, step, total)
        if self.emit_preview is not None:
            ctx.preview = lambda x0, latent_format: self.preview(ctx.node_id, x0, latent_format.scale_factor)
        return ctx

    def _run_interpreter(self) -> None:
        self.outcome.engine = "interpreter"
        job = self.job
        run_graph(job.graph, self._context(), targets=job.outputs, cache=self.runner.cache, events=self)
        self.runner.plans.submitted(job.prompt, job.graph)

    def _run_plan(self, entry, values: dict) -> None:
        """A plan serves the prompt; the output nodes' results are cached like the interpreter's."""
        runner, job = self.runner, self.job
        order = job.graph.topological_order(job.outputs)
        sigs = signatures(job.graph, order, runner.config.input_dir)
        if all(sigs[n] in runner.cache for n in job.outputs):   # resubmitted: nothing runs
            self.outcome.engine = "cache"
            self.cached(list(order))
            for node_id in job.outputs:
                ui = runner.cache.get(sigs[node_id]).ui
                if ui is not None:
                    self.executed(node_id, ui)
            return
        self.cached([])
        self.outcome.engine = f"plan {entry.name}"
        plan = runner.plans.loaded(entry)
        announced: set[str] = set()

        def on_stage(stage) -> None:
            for node_id in stage.node_ids:
                if node_id not in announced:
                    announced.add(node_id)
                    self.executing(node_id)

        def on_step(stage_name: str, step: int, total: int) -> None:
            self.progress(self.current, step, total)

        def on_preview(stage_name: str, x0, scale_factor: float) -> None:
            self.preview(self.current, x0, scale_factor)

        result = run_plan(plan, values, output_dir=runner.config.output_dir, on_step=on_step,
                          settings=runner.config.settings, prompt=job.prompt,
                          extra_pnginfo=job.extra_data.get("extra_pnginfo"), on_stage=on_stage,
                          on_preview=on_preview if self.emit_preview is not None else None,
                          lora_dirs=runner.config.models.searched("loras"), input_dir=runner.config.input_dir)
        for node_id, images in result.images.items():
            ui = UiOutput(tuple(images))
            self.executed(node_id, ui)
            runner.cache.put(sigs[node_id], (), ui, registry.get(job.graph.nodes[node_id].class_type).outputs)
        runner.cache.trim(set(sigs.values()))
