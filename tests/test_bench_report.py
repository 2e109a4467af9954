"""kiln bench's report on a synthetic study (no models run): 2 samplers (x) × 2 step counts (y) ×
2 backends (z), one cell served by the interpreter after the plan refused it, one not run (the
study was stopped), one identical to the reference (infinite PSNR). The grids must put each cell's
image where its image-map rectangle says; the page must load in a real browser without a
single console complaint and sort its table."""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from browser import browser_page
from kiln.bench import plots
from kiln.bench.grid import MARK, PLACEHOLDER, write_grids
from kiln.bench.report import write_report

AXES = [{"name": "sampler_name", "role": "x", "node_id": "3", "input_name": "sampler_name",
         "values": ["euler", "dpmpp_2m"]},
        {"name": "steps", "role": "y", "node_id": "3", "input_name": "steps", "values": [4, 8]},
        {"name": "backend", "role": "z", "node_id": None, "input_name": None, "values": ["interpreter", "onnx"]}]
FALLBACK = {"sampler_name": "dpmpp_2m", "steps": 8, "backend": "onnx"}
NOT_RUN = {"sampler_name": "dpmpp_2m", "steps": 4, "backend": "onnx"}
REFERENCE = {"sampler_name": "euler", "steps": 8, "backend": "interpreter"}
SIDE = 64   # the cells' images; the grid enlarges them ×2 to its 128 px minimum


def make_results(folder: Path, axes: list[dict] = AXES) -> dict:
    """A results dict as ``kiln bench`` writes it, with a solid-colour 64 px image per cell run."""
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    cells = []
    for index, combination in enumerate(itertools.product(*[axis["values"] for axis in axes])):
        values = {axis["name"]: value for axis, value in zip(axes, combination)}
        name = ",".join(f"{key}={value}" for key, value in values.items())
        backend = values.get("backend", "interpreter")
        steps = values.get("steps", 4)
        done = values != NOT_RUN
        fallback = "the plan cannot take sampler_name=dpmpp_2m <yet>" if values == FALLBACK else None
        image = None
        if done:
            image = f"cells/{name}.png"
            Image.new("RGB", (SIDE, SIDE), color_of(index)).save(folder / image)
        median = steps * (0.05 if backend == "onnx" and not fallback else 0.11) * (1.3 if "dpmpp" in name else 1)
        psnr = float("inf") if values == REFERENCE else 20.0 + steps + index
        cells.append({
            "name": name, "values": values,
            "engine": {"backend": backend, "dtype": "fp32", "device": "cpu"},
            "ran_on": "interpreter" if fallback else backend, "fallback": fallback,
            "status": "done" if done else "pending", "image": image, "seeds": [1],
            "time_s": {"median": median, "min": median * 0.97, "max": median * 1.1, "stdev": 0.01} if done else None,
            "compile_s": 12.0 if backend == "onnx" and done else None,
            "steps": steps if done else None, "model_calls": steps if done else None,
            "ms_per_model_call": 1000 * median / steps if done else None,
            "peak_memory_mib": (500.0 if backend == "onnx" and not fallback else 812.0) if done else None,
            "memory_kind": "rss", "gflops": 1.5 * steps if done else None, "floor_pct": 3.1 if done else None,
            "fidelity": {"reference": {"psnr": psnr, "ssim": 0.9, "latent_rmse": 0.05},
                         "fp32_interpreter": {"psnr": 60.0, "ssim": 1.0, "latent_rmse": 0.0}} if done else None,
            "pareto": False, "workflow": {},
        })
    ran = [cell for cell in cells if cell["status"] == "done"]
    for cell in ran:   # nothing else both as fast and as close to the reference
        time, psnr = cell["time_s"]["median"], cell["fidelity"]["reference"]["psnr"]
        cell["pareto"] = not any(other["time_s"]["median"] <= time and other["fidelity"]["reference"]["psnr"] >= psnr
                                 and other is not cell for other in ran)
    return {"kiln_bench": 1,
            "study": {"workflow_file": "hires <1>.json", "kiln_version": "0.1.0", "created": "2026-12-06T22:40:00",
                      "axes": axes, "seeds": [1], "repeat": 3, "warmup": 1,
                      "reference": "the fp32 interpreter at steps=8", "peak_tflops": 0.38,
                      "peak_source": "estimated: 2 cores × 3.0 GHz × 64 fp32 FLOP/cycle; give --peak-tflops",
                      "device": "cpu (2 threads)", "cells_total": len(cells)},
            "cells": cells}


def color_of(index: int) -> tuple[int, int, int]:
    return (30 * index % 256, 200 - 20 * index, 60 + 10 * index)


@pytest.fixture
def report(tmp_path) -> tuple[dict, Path]:
    results = make_results(tmp_path)
    return results, write_report(results, tmp_path)


def test_grids_place_each_cell_where_its_area_says(tmp_path):
    results = make_results(tmp_path)
    grids = write_grids(results, tmp_path)
    assert [grid.file for grid in grids] == ["grid_interpreter.png", "grid_onnx.png"]
    assert [grid.title for grid in grids] == ["backend=interpreter", "backend=onnx"]
    by_name = {cell["name"]: (index, cell) for index, cell in enumerate(results["cells"])}
    for grid in grids:
        image = Image.open(tmp_path / grid.file).convert("RGB")
        assert len(grid.areas) == 4
        assert len({x0 for x0, *_ in grid.areas}) == 2 and len({y0 for _, y0, *_ in grid.areas}) == 2
        for x0, y0, x1, y1, name, href in grid.areas:
            assert (x1 - x0, y1 - y0) == (2 * SIDE, 2 * SIDE)
            assert 0 < x0 and x1 < image.width and 0 < y0 and y1 < image.height
            index, cell = by_name[name]
            if cell["status"] != "done":
                assert href is None
                assert image.getpixel((x0 + 2, y0 + 2)) == PLACEHOLDER
                continue
            assert href == cell["image"] and (tmp_path / href).is_file()
            assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == color_of(index)
            assert (image.getpixel((x0 + 1, y1 - 1)) == MARK) == bool(cell["fallback"])
        assert image.width < 2 * 2 * SIDE + 250 and image.height < 2 * 2 * SIDE + 120


def test_one_grid_without_page_axes_and_long_labels_stay_inside(tmp_path):
    short = [dict(AXES[0]), dict(AXES[1])]
    long = [dict(AXES[0], values=["euler_" + "ancestral_" * 8, "dpmpp_2m"]),
            dict(AXES[1], name="steps_" + "x" * 60)]
    (grid,) = write_grids(make_results(tmp_path / "short", short), tmp_path / "short")
    (long_grid,) = write_grids(make_results(tmp_path / "long", long), tmp_path / "long")
    assert grid.file == long_grid.file == "grid.png"
    assert grid.title == "hires <1>.json"
    width = Image.open(tmp_path / "long" / "grid.png").width
    assert width - Image.open(tmp_path / "short" / "grid.png").width <= 180
    assert max(x1 for _, _, x1, *_ in long_grid.areas) < width


def test_plots_only_when_there_is_something_to_plot(tmp_path):
    results = make_results(tmp_path)
    for plot in (plots.time_vs_steps, plots.fidelity_vs_time, plots.fidelity_vs_steps, plots.memory_by_engine):
        svg = plot(results)
        assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
        assert svg == plot(results)   # deterministic
    assert "Pareto front" in plots.fidelity_vs_time(results)
    assert "∞ (identical)" in plots.fidelity_vs_steps(results)
    assert "sampler_name=euler, backend=onnx" in plots.time_vs_steps(results)
    assert "peak RSS (MiB)" in plots.memory_by_engine(results)
    no_steps = make_results(tmp_path / "no_steps", [AXES[0], AXES[2]])
    assert plots.time_vs_steps(no_steps) is None and plots.fidelity_vs_steps(no_steps) is None
    for cell in no_steps["cells"]:
        cell["fidelity"] = None
    assert plots.fidelity_vs_time(no_steps) is None


def test_page_holds_summary_plots_grids_and_table(report):
    results, page = report
    text = page.read_text(encoding="utf-8")
    assert text.count("<svg") == 4
    body = text[text.index("<tbody>"):text.index("</tbody>")]
    assert body.count("<tr") == len(results["cells"])
    assert "stopped: 7 of 8 cells finished; <code>--resume</code> continues" in text
    assert "hires &lt;1&gt;.json" in text and "hires <1>" not in text
    assert "&lt;yet&gt;" in text and "<yet>" not in text
    assert not re.search(r"(src|href)=\"(https?:)?//", text)   # nothing from the network
    hrefs = re.findall(r'<area [^>]*href="([^"]+)"', text)
    assert len(hrefs) == 7   # every cell that ran
    assert all((page.parent / unquote(href)).is_file() for href in hrefs)


def test_page_loads_and_sorts_in_a_browser(report):
    _, path = report
    with browser_page() as (page, problems):
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img", "images => images.map(image => image.naturalWidth)")
        assert len(widths) == 2 and all(width > 0 for width in widths)

        headings = page.eval_on_selector_all("table.cells thead th", "ths => ths.map(th => th.textContent)")

        def sort_by(heading: str) -> list[str]:
            """Click the heading; the column's sort keys, top to bottom."""
            index = headings.index(heading)
            page.locator("table.cells thead th").nth(index).click()
            return page.eval_on_selector_all("table.cells tbody tr", "(rows, index) => "
                                             "rows.map(row => row.cells[index].dataset.sort)", index)

        ascending = sort_by("median s")
        assert ascending[-1] == "" and [float(v) for v in ascending[:-1]] == sorted(float(v) for v in ascending[:-1])
        assert page.locator("table.cells thead th[aria-sort=ascending]").text_content() == "median s"
        descending = sort_by("median s")
        assert descending[-1] == "" and descending[:-1] == ascending[:-1][::-1]   # not run stays last
        assert sort_by("PSNR dB (ref)")[-2:] == ["Infinity", ""]
        assert problems == []
