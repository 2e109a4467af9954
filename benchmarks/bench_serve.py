"""``kiln serve`` under load on the tiny fixtures (CPU): requests/s and p50/p95 latency (POST
/prompt to the WebSocket's ``executing node: null``) for 1, 2 and 4 concurrent clients, on the
interpreter path and the plan path, beside the same workflow run in-process (what ``kiln run``
spends per image once loaded), and the time from spawning the server to its first answered
``POST /prompt``. Every prompt gets its own seed, so nothing is answered from the node cache.

With ``--ray``, the same load on ``kiln serve --ray`` (a local Ray cluster) with 1 and 2 replicas
of one CPU each, in the same run.

Usage: ``python benchmarks/bench_serve.py [--requests 8] [--ray] [--results bench_serve]``.
Writes ``benchmarks/results/<results>.json`` and ``<results>.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

RESULTS = Path(__file__).parent / "results"
CONCURRENCY = (1, 2, 4)


def workflow(seed: int) -> dict:
    from workflows import txt2img, variant

    return variant(txt2img(steps=8), "3", seed=seed)


def in_process(models: Path, plan: Path, work: Path, runs: int) -> dict:
    """Seconds per image of the interpreter and of a loaded plan, warm; the interpreter keeps its
    node cache as the server does (models and the unchanged prompt's conditioning stay)."""
    from kiln.compiler.interpreter import run_graph
    from kiln.compiler.node_cache import NodeCache
    from kiln.compiler.validate import validate
    from kiln.compiler.workflow import parse_workflow
    from kiln.kernels.settings import Settings
    from kiln.nodes.folders import ModelFolders
    from kiln.nodes.registry import RunContext
    from kiln.runtime.executor import run_plan
    from kiln.runtime.plan import load_plan

    folders = ModelFolders.from_models_dir(models)
    ctx = RunContext(models=folders, output_dir=str(work / "interp"))
    cache = NodeCache(None, None)
    times = {"interpreter": [], "plan": []}
    loaded = load_plan(plan, settings=Settings(cache_dir=work / "cache"))
    for i in range(runs + 1):
        graph = validate(parse_workflow(workflow(1000 + i)), folders)
        start = time.perf_counter()
        run_graph(graph, ctx, cache=cache)
        times["interpreter"].append(time.perf_counter() - start)
        start = time.perf_counter()
        run_plan(loaded, {"3.seed": 1000 + i}, output_dir=work / "plan")
        times["plan"].append(time.perf_counter() - start)
    return {engine: statistics.median(t[1:]) for engine, t in times.items()}   # the first run warms up


def load(server, clients: int, requests_per_client: int, seed_base: int) -> dict:
    from serve_client import Socket

    latencies: list[float] = []
    prompt_ids: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        ws = Socket(server)
        try:
            for r in range(requests_per_client):
                start = time.perf_counter()
                prompt = workflow(seed_base + index * 1000 + r)
                prompt_id = server.queue_prompt(prompt, client_id=ws.client_id)["prompt_id"]
                ws.until_done(prompt_id)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    prompt_ids.append(prompt_id)
        finally:
            ws.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    return {"clients": clients, "requests": len(latencies), "requests_per_s": len(latencies) / wall,
            "p50_s": statistics.median(latencies), "p95_s": p95,
            "run_p50_s": statistics.median(run_seconds(server, prompt_ids))}


def run_seconds(server, prompt_ids: list[str]) -> list[float]:
    """Each prompt's time on the worker, from its history's execution_start/execution_success stamps."""
    import requests

    seconds = []
    for prompt_id in prompt_ids:
        messages = requests.get(f"{server.url}/history/{prompt_id}", timeout=10).json()[prompt_id]["status"]["messages"]
        stamps = {event: data["timestamp"] for event, data in messages}
        seconds.append((stamps["execution_success"] - stamps["execution_start"]) / 1000)
    return seconds


def torch_import() -> float:
    """Seconds a fresh interpreter takes to ``import torch``: the floor under any start that loads it."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def first_answer(models: Path, work: Path, plans: Path) -> float:
    """Seconds from spawning ``kiln serve`` to its first answered ``POST /prompt``."""
    import requests
    from serve_client import free_port

    port = free_port()
    start = time.perf_counter()
    command = [sys.executable, "-m", "kiln.cli", "serve", "--models", str(models), "--input-dir", str(work / "input"),
               "--output-dir", str(work / "start-out"), "--port", str(port), "--plans", str(plans)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                answer = requests.post(f"http://127.0.0.1:{port}/prompt", json={"prompt": workflow(1)}, timeout=30)
                if answer.status_code == 200:
                    return time.perf_counter() - start
            except requests.ConnectionError:
                time.sleep(0.02)
    finally:
        process.terminate()
        process.wait()


def markdown(rows: list[dict], base: dict, start: dict, meta: dict) -> str:
    lines = [f"# kiln serve under load ({meta['device']}, torch {meta['torch']}, tiny SD1.5 txt2img 64², 8 steps)", "",
             f"In-process per image (what `kiln run` spends once loaded): interpreter {base['interpreter']:.3f} s, "
             f"plan {base['plan']:.3f} s. Server start to first answered POST /prompt: {start['first_answer_s']:.2f} s "
             f"(of which a bare `python -c 'import torch'` takes {start['torch_import_s']:.2f} s).", "",
             "p50/p95: POST /prompt to the WebSocket's `executing node: null`. `run`: the prompt's time on the "
             "worker (history timestamps). `s/image`: wall time over requests; both compared with the in-process "
             f"time of the same engine ({meta['threads']} threads). Workers: `local` is one worker thread in the "
             "server process (one prompt at a time, as in ComfyUI, all cores); `ray xN`: N Ray Serve replicas of "
             "one CPU each, one prompt each at a time.", "",
             "| path | clients | requests | req/s | p50 s | p95 s | run p50 s | run / in-process | s/image "
             "| s/image / in-process |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines[-2] = "| workers " + lines[-2]
    for r in rows:
        per_image, own = 1 / r["requests_per_s"], base[r["path"]]
        lines.append(f"| {r['workers']} | {r['path']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                     f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['run_p50_s']:.3f} | {r['run_p50_s'] / own:.3f} | "
                     f"{per_image:.3f} | {per_image / own:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--results", default="bench_serve")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--ray", action="store_true", help="also kiln serve --ray with 1 and 2 replicas")
    args = parser.parse_args(argv)

    import torch

    from kiln.compiler.pipeline import compile_workflow
    from kiln.demo import write_demo_models
    from kiln.kernels.settings import Settings
    from serve_client import Server

    work = args.workdir or Path(tempfile.mkdtemp(prefix="kiln-bench-serve-"))
    models, plans = work / "models", work / "plans"
    write_demo_models(models)
    (work / "input").mkdir(parents=True, exist_ok=True)
    plan = compile_workflow(workflow(0), models=models, output=plans / "t2i.plan",
                            settings=Settings(cache_dir=work / "cache"))
    before = in_process(models, plan, work, runs=10)
    start = {"first_answer_s": min(first_answer(models, work, plans) for _ in range(3)),
             "torch_import_s": min(torch_import() for _ in range(3))}
    pools = [("local", ())] + ([(f"ray x{n}", ("--ray", "--replicas", str(n), "--cpus-per-replica", "1"))
                                for n in (1, 2)] if args.ray else [])
    rows = []
    for workers, pool in pools:
        for path, extra in (("interpreter", ()), ("plan", ("--plans", str(plans)))):
            out = work / f"out-{path}-{workers.replace(' ', '')}"
            server = Server(models, work / "input", out, *extra, *pool, cache=work / "cache", timeout=300)
            try:
                load(server, 2, 2, seed_base=10 ** 6)   # warm: every worker's models loaded, plan opened
                for clients in CONCURRENCY:
                    rows.append({"workers": workers, "path": path,
                                 **load(server, clients, args.requests, seed_base=clients * 10 ** 5)})
                    print(json.dumps(rows[-1]), file=sys.stderr)
            finally:
                server.stop()
    after = in_process(models, plan, work, runs=10)   # the machine drifts: bracket the server runs
    base = {engine: (before[engine] + after[engine]) / 2 for engine in before}
    meta = {"device": f"cpu ({platform.machine()})", "torch": torch.__version__, "threads": torch.get_num_threads()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.results}.json").write_text(json.dumps({"meta": meta, "in_process_s": base,
                                                               "in_process_before_after_s": [before, after],
                                                               "start": start, "rows": rows}, indent=1))
    (RESULTS / f"{args.results}.md").write_text(markdown(rows, base, start, meta))
    print(markdown(rows, base, start, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
