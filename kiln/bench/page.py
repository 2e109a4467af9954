"""The study's report page, ``index.html``: one self-contained file (CSS, JS and plots inline,
nothing fetched from the network) that opens from the report folder, where the grids and the
cells' images it links to live. Every string that came from the user is escaped."""
from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kiln.bench.grid import Grid

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em 2em; color: #1a1a1a; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; }
.summary th { text-align: left; padding-right: 1.2em; font-weight: 600; vertical-align: top; }
.stopped { background: #fff3cd; border: 1px solid #e0c060; padding: .4em .8em; display: inline-block; }
.scroll { overflow-x: auto; }
.plots svg { max-width: 100%; height: auto; }
.cells th, .cells td { border: 1px solid #ddd; padding: .2em .5em; white-space: nowrap; }
.cells td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cells thead th { background: #f3f3f3; cursor: pointer; position: sticky; top: 0; user-select: none; }
.cells th[aria-sort=ascending]::after { content: " \\25B2"; }
.cells th[aria-sort=descending]::after { content: " \\25BC"; }
.cells tr.not-run td { color: #999; }
.fallback { color: #c02828; font-weight: 600; cursor: help; }
"""

# Click a header to sort by it, again to reverse; numbers by value (Infinity above all), missing
# values last either way.
JS = """
for (const th of document.querySelectorAll("table.cells thead th")) {
  th.addEventListener("click", () => {
    const table = th.closest("table"), column = th.cellIndex;
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    for (const other of th.parentElement.cells) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const key = row => row.cells[column].dataset.sort ?? row.cells[column].textContent;
    const compare = th.dataset.type === "num"
      ? (a, b) => parseFloat(a) - parseFloat(b)
      : (a, b) => a.localeCompare(b, undefined, {numeric: true});
    const rows = [...table.tBodies[0].rows];
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === "" || y === "") return (x === "") - (y === "");
      return ascending ? compare(x, y) : compare(y, x);
    });
    table.tBodies[0].append(...rows);
  });
}
"""


@dataclass(frozen=True)
class Column:
    heading: str
    numeric: bool
    render: Callable[[dict], tuple[Any, str]]   # cell -> (number to sort by, or None; inner HTML)


def write_page(results: dict, folder: Path, grids: list[Grid], plots: dict[str, str]) -> Path:
    """Write ``folder/index.html`` from the results, the grids already drawn into ``folder`` and
    the plots (heading -> inline SVG); return its path."""
    study = results["study"]
    title = f"kiln bench: {study['workflow_file']}"
    parts = [f"<h1>{_e(title)}</h1>", _summary(results),
             '<p><a href="results.json">results.json</a> · <a href="results.csv">results.csv</a></p>']
    if grids:
        parts.append("<h2>Grids</h2>" + "".join(_grid(grid, index) for index, grid in enumerate(grids)))
    if plots:
        parts.append('<div class="plots">' + "".join(f"<h2>{_e(heading)}</h2>\n{svg}" for heading, svg in plots.items())
                     + "</div>")
    parts.append("<h2>Cells</h2>" + _table(results))
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_e(title)}</title>\n'
            f'<link rel="icon" href="data:,">\n<style>{CSS}</style>\n</head>\n<body>\n'
            + "\n".join(parts) + f"\n<script>{JS}</script>\n</body>\n</html>\n")
    path = Path(folder) / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def _summary(results: dict) -> str:
    study = results["study"]
    done = sum(cell.get("status") == "done" for cell in results["cells"])
    total = study.get("cells_total") or len(results["cells"])
    seeds = study.get("seeds")
    peak = study.get("peak_tflops")
    rows = [("workflow", study["workflow_file"]),
            *((f"{axis['name']} ({_axis_role(axis)})", ", ".join(map(str, axis["values"]))) for axis in study["axes"]),
            ("seeds", ", ".join(map(str, seeds)) if seeds else "the workflow's own"),
            ("repeat", f"{study.get('repeat')} timed, {study.get('warmup')} warm-up"),
            ("reference", study.get("reference")),
            ("FLOP peak", f"{_fmt(peak, 'g')} TFLOP/s ({study.get('peak_source') or 'source unknown'})"),
            ("device", study.get("device")),
            ("date", study.get("created")),
            ("kiln", study.get("kiln_version")),
            ("cells", f"{done} of {total} done")]
    table = '<table class="summary">' + "".join(f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>"
                                                for key, value in rows) + "</table>"
    if done < total:
        table += (f'\n<p class="stopped">stopped: {done} of {total} cells finished; '
                  "<code>--resume</code> continues</p>")
    return table


def _axis_role(axis: dict) -> str:
    target = f"; node {axis['node_id']} · {axis['input_name']}" if axis.get("node_id") is not None else ""
    return f"{axis['role']}{target}"


def _grid(grid: Grid, index: int) -> str:
    name = f"grid-{index}"
    areas = "".join(
        f'<area shape="rect" coords="{x0},{y0},{x1},{y1}" alt="{_e(cell)}" title="{_e(cell)}" href="{_href(href)}">'
        if href else f'<area shape="rect" coords="{x0},{y0},{x1},{y1}" alt="{_e(cell)}" title="{_e(cell)} (not run)">'
        for x0, y0, x1, y1, cell, href in grid.areas)
    return (f'<div class="scroll"><img src="{_href(grid.file)}" usemap="#{name}" alt="{_e(grid.title)}"></div>\n'
            f'<map name="{name}">{areas}</map>\n')


def _table(results: dict) -> str:
    columns = _columns(results["study"]["axes"])
    head = "".join(f'<th{" data-type=num" if column.numeric else ""}>{_e(column.heading)}</th>' for column in columns)
    rows = []
    for cell in results["cells"]:
        tds = []
        for column in columns:
            key, content = column.render(cell)
            if column.numeric:
                tds.append(f'<td class="num" data-sort="{_sort_key(key)}">{content}</td>')
            else:
                tds.append(f"<td>{content}</td>")
        row_class = "" if cell.get("status") == "done" else ' class="not-run"'
        rows.append(f"<tr{row_class}>{''.join(tds)}</tr>")
    return (f'<div class="scroll"><table class="cells">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(rows) + "\n</tbody></table></div>")


def _columns(axes: list[dict]) -> list[Column]:
    def number(heading: str, get: Callable[[dict], Any], spec: str | Callable[[float], str]) -> Column:
        return Column(heading, True, lambda cell: (get(cell), _e(_fmt(get(cell), spec))))

    def time(key: str) -> Callable[[dict], Any]:
        return lambda cell: (cell.get("time_s") or {}).get(key)

    def fidelity(against: str, metric: str) -> Callable[[dict], Any]:
        return lambda cell: ((cell.get("fidelity") or {}).get(against) or {}).get(metric)

    def axis_column(axis: dict) -> Column:
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in axis["values"])
        return number(axis["name"], lambda cell: cell["values"].get(axis["name"]), "g") if numeric else \
            Column(axis["name"], False, lambda cell: (None, _e(_fmt(cell["values"].get(axis["name"])))))

    def spread(cell: dict) -> tuple[Any, str]:
        low, high = time("min")(cell), time("max")(cell)
        if low is None or high is None:
            return None, "–"
        return high - low, f"{_fmt(low, _sig)}–{_fmt(high, _sig)}"

    columns = [Column("cell", False, _cell_link), *map(axis_column, axes), Column("ran on", False, _ran_on),
               number("median s", time("median"), _sig), Column("spread s", True, spread),
               number("compile s", lambda cell: cell.get("compile_s"), _sig),
               number("steps", lambda cell: cell.get("steps"), "g"),
               number("model calls", lambda cell: cell.get("model_calls"), "g"),
               number("ms/call", lambda cell: cell.get("ms_per_model_call"), _sig),
               number("peak MiB", lambda cell: cell.get("peak_memory_mib"), ",.0f"),
               number("GFLOP", lambda cell: cell.get("gflops"), _sig),
               number("% of FLOP floor", lambda cell: cell.get("floor_pct"), _sig)]
    for against, label in (("reference", "ref"), ("fp32_interpreter", "fp32 interp.")):
        columns += [number(f"PSNR dB ({label})", fidelity(against, "psnr"), ".2f"),
                    number(f"SSIM ({label})", fidelity(against, "ssim"), ".4f"),
                    number(f"latent RMSE ({label})", fidelity(against, "latent_rmse"), ".3g")]
    return columns


def _cell_link(cell: dict) -> tuple[Any, str]:
    if cell.get("status") == "done" and cell.get("image"):
        return None, f'<a href="{_href(cell["image"])}">{_e(cell["name"])}</a>'
    return None, _e(cell["name"])


def _ran_on(cell: dict) -> tuple[Any, str]:
    if cell.get("status") != "done":
        return None, "not run"
    ran_on = _e(cell.get("ran_on") or "–")
    if cell.get("fallback"):
        return None, f'{ran_on} <span class="fallback" title="{_e(cell["fallback"])}">⚠ fallback</span>'
    return None, ran_on


def _sig(value: float) -> str:
    """Three significant digits, without switching to exponents for large values."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _fmt(value: Any, spec: str | Callable[[float], str] = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if callable(spec):
        return spec(value)
    return format(value, spec)


def _sort_key(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(float(value))


def _href(path: str) -> str:
    """A relative URL of a file in the report folder (cell names hold ``=`` and ``,``, kept readable)."""
    return _e(quote(path, safe="/=,+"))


def _e(value: Any) -> str:
    return html.escape("–" if value is None else str(value))
