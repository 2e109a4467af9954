"""The interpreter's node cache (ComfyUI's cache semantics) and its LRU bounds."""
from __future__ import annotations

import os

import torch

from kiln.compiler.node_cache import NodeCache, signatures
from kiln.compiler.workflow import parse_workflow
from workflows import img2img, txt2img, variant


def _signatures(workflow: dict, input_dir=None) -> dict[str, str]:
    graph = parse_workflow(workflow)
    return signatures(graph, graph.topological_order(), input_dir)


def test_a_change_reaches_exactly_what_depends_on_it():
    before, after = _signatures(txt2img()), _signatures(variant(txt2img(), "7", text="grainy"))
    changed = {node for node in before if before[node] != after[node]}
    assert changed == {"7", "3", "8", "9"}   # not the loader, the other prompt or the empty latent


def test_an_input_image_is_compared_by_its_file(input_dir):
    first = _signatures(img2img(), str(input_dir))
    path = input_dir / "input.png"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    try:
        second = _signatures(img2img(), str(input_dir))
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert first["10"] != second["10"] and first["4"] == second["4"]


def test_least_recently_used_entries_go_beyond_the_bounds_the_latest_run_kept():
    cache = NodeCache(max_models=1, max_bytes=1000)
    model = torch.nn.Linear(2, 2)
    cache.put("old-model", (model,), None, ("MODEL",))
    cache.put("new-model", (torch.nn.Linear(2, 2),), None, ("MODEL",))
    cache.put("latent", ({"samples": torch.zeros(10)},), None, ("LATENT",))
    assert cache.stats() == {"entries": 3, "models": 2, "bytes": 2 * 6 * 4 + 40}
    cache.trim({"new-model", "latent"})
    assert "old-model" not in cache and "new-model" in cache and "latent" in cache
    cache.put("big", (torch.zeros(300),), None, ("LATENT",))   # 1200 bytes, over the budget alone
    cache.trim({"big"})
    assert "big" in cache and "new-model" not in cache and "latent" not in cache   # the latest run's stays
