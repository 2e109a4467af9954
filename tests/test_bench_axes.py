"""kiln bench's pieces without running a model: axis parsing, the cells a study spans, the
reference each cell is compared with, fidelity numbers and the Pareto front."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kiln.bench.axes import engine_axis, parse_axis, parse_seeds, parse_values
from kiln.bench.fidelity import compare
from kiln.bench.plan_groups import group_cells, runtime_inputs
from kiln.bench.results import dumps, load, mark_pareto
from kiln.bench.study import Study, parse_reference
from kiln.compiler.workflow import parse_workflow
from kiln.kernels.errors import KilnError
from workflows import hires_fix, txt2img


@pytest.mark.parametrize("raw,values", [
    ("euler,dpmpp_2m", ["euler", "dpmpp_2m"]),
    ("8..32:8", [8, 16, 24, 32]),
    ("2..4", [2, 3, 4]),
    ("5..6:0.5", [5.0, 5.5, 6.0]),
    ("4,8..10:2,7.5", [4, 8, 10, 7.5]),
    ('["a fox, red", "a cat"]', ["a fox, red", "a cat"]),
    ("true,false", [True, False]),
])
def test_values(raw, values):
    assert parse_values("--x", "v", raw) == values


@pytest.mark.parametrize("raw,message", [
    ("5.5..7", "needs a step"), ("8..4", "runs upwards"), ("1..5000", "more than 1000"), ("a,a", "given twice"),
    ("[1, [2]]", "number, true/false or text"), ("[1,", "not JSON"),
])
def test_bad_values(raw, message):
    with pytest.raises(KilnError, match=message):
        parse_values("--x", "v", raw)


def test_axes_resolve_bare_names_and_nodes():
    graph = parse_workflow(txt2img())
    axis = parse_axis("--x", "sampler_name=euler,heun", "x", graph, None)
    assert (axis.node_id, axis.input_name, axis.values) == ("3", "sampler_name", ("euler", "heun"))
    assert parse_axis("--y", "5.width=64..96:32", "y", graph, None).values == (64, 96)
    assert engine_axis("--dtype", "dtype", "fp32,bf16").values == ("fp32", "bf16")
    hires = parse_workflow(hires_fix())
    with pytest.raises(KilnError, match="several nodes have a 'steps' widget: 3 .KSampler., 14 .KSampler."):
        parse_axis("--y", "steps=4,8", "y", hires, None)
    assert parse_axis("--y", "steps=4,8", "y", hires, "14").node_id == "14"
    assert parse_seeds("1..3") == [1, 2, 3]
    with pytest.raises(KilnError, match="whole numbers"):
        parse_seeds("1.5")


def test_cells_run_x_fastest_and_references_take_the_largest_steps():
    graph = parse_workflow(txt2img())
    axes = [parse_axis("--x", "sampler_name=euler,heun", "x", graph, None),
            parse_axis("--y", "steps=4,8", "y", graph, None), engine_axis("--backend", "backend", "interpreter,onnx")]
    study = Study(graph, "t2i.json", axes, seeds=[1, 2], reference=parse_reference(None, axes, graph, None))
    cells = study.cells()
    assert [c.name for c in cells[:3]] == ["sampler_name=euler,steps=4,backend=interpreter",
                                            "sampler_name=heun,steps=4,backend=interpreter",
                                            "sampler_name=euler,steps=8,backend=interpreter"]
    onnx = cells[4]
    assert onnx.engine.backend == "onnx" and onnx.overrides == {("3", "sampler_name"): "euler", ("3", "steps"): 4}
    reference = study.reference_sample(onnx, 2)
    assert reference.overrides[("3", "steps")] == 8 and reference.engine.label == "interpreter/fp32/cpu"
    assert study.graph_of(reference).nodes["3"].inputs["seed"] == 2
    assert study.baseline_sample(onnx, 2).key == study.sample(cells[0], 2).key   # the same interpreter run
    assert study.describe_reference() == "the fp32 interpreter at steps=8"
    chosen = parse_reference("steps=64,sampler_name=dpmpp_2m,dtype=bf16", axes, graph, None)
    assert chosen == {"3.steps": 64, "3.sampler_name": "dpmpp_2m", "dtype": "bf16"}
    with pytest.raises(KilnError, match="the reference runs on the interpreter"):
        parse_reference("backend=onnx", axes, graph, None)


def test_one_plan_per_backend_and_size_the_rest_taken_at_run_time():
    graph = parse_workflow(txt2img())
    axes = [parse_axis("--x", "sampler_name=euler,heun", "x", graph, None),
            parse_axis("--y", "5.width=64,96", "y", graph, None), parse_axis("--z", "cfg=5..7", "z", graph, None),
            engine_axis("--backend", "backend", "interpreter,onnx")]
    groups = group_cells(Study(graph, "t2i.json", axes), Study(graph, "t2i.json", axes).cells())
    assert [(engine.backend, len(cells)) for engine, cells in groups] == [("interpreter", 12), ("onnx", 6), ("onnx", 6)]
    widths = [{cell.values["5.width"] for cell in cells} for _, cells in groups[1:]]
    assert widths == [{64}, {96}]   # a plan per size, compiled at it
    assert runtime_inputs(Study(graph, "t2i.json", axes), groups[1][1]) == ["3.sampler_name", "3.cfg=5..7"]


def test_odd_values_make_safe_unique_file_names():
    graph = parse_workflow(txt2img())
    axes = [parse_axis("--x", '6.text=["a fox/cat", "a fox:cat"]', "x", graph, None)]
    names = [c.name for c in Study(graph, "t2i.json", axes).cells()]
    assert names[0] == "6.text=a_fox_cat" and names[1].startswith("6.text=a_fox_cat~") and len(set(names)) == 2


def test_fidelity_numbers():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    latent = torch.randn(1, 4, 4, 4)
    same = compare([image], [image.copy()], [latent], [latent.clone()])
    assert same == {"psnr": math.inf, "ssim": 1.0, "latent_rmse": 0.0}
    noisy = np.clip(image.astype(int) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    near = compare([noisy], [image], [latent + 0.1], [latent])
    assert 25 < near["psnr"] < 40 and 0 < near["ssim"] < 1 and near["latent_rmse"] == pytest.approx(0.1, abs=1e-6)
    other_size = compare([image[:16]], [image], [None], [latent])
    assert other_size == {"psnr": None, "ssim": None, "latent_rmse": None}


def test_pareto_front_and_infinite_psnr_round_trip(tmp_path):
    def cell(name, seconds, psnr):
        return {"name": name, "status": "done", "time_s": {"median": seconds},
                "fidelity": {"reference": {"psnr": psnr}}}
    cells = [cell("fast", 1.0, 30.0), cell("slow-exact", 3.0, math.inf), cell("dominated", 2.0, 25.0),
             cell("middle", 2.0, 40.0)]
    mark_pareto(cells)
    assert [c["name"] for c in cells if c["pareto"]] == ["fast", "slow-exact", "middle"]
    path = tmp_path / "results.json"
    path.write_text(dumps({"kiln_bench": 1, "cells": cells}))
    assert '"inf"' in path.read_text() and load(path)["cells"][1]["fidelity"]["reference"]["psnr"] == math.inf
