"""The report's plots as inline SVG text. Figures are plain ``matplotlib.figure.Figure`` objects
(no pyplot, so no global state and no backend to choose), rendered with a fixed hash salt and no
date, so the same results give the same page. Each function returns None when the study has
nothing to plot for it."""
from __future__ import annotations

import io
import itertools
import math

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

MARKERS = "osD^vP*X"
INF_LABEL = "∞ (identical)"


def time_vs_steps(results: dict) -> str | None:
    """Median wall time against steps, one line per combination of the other axes' values."""
    series = _by_steps(results, lambda cell: (cell.get("time_s") or {}).get("median"))
    if not series:
        return None
    fig, ax = _figure()
    for (label, points), marker in zip(series.items(), itertools.cycle(MARKERS)):
        ax.plot(*zip(*points), marker=marker, label=label)
    _steps_ticks(ax, series)
    ax.set(xlabel="steps", ylabel="median wall time (s)", title="Wall time vs steps")
    ax.set_ylim(bottom=0)
    return _svg(fig, ax, "time_vs_steps", legend=len(series) > 1)


def fidelity_vs_steps(results: dict) -> str | None:
    """PSNR against the reference vs steps, one line per combination of the other axes' values;
    identical images (infinite PSNR) drawn at a cap just above the finite ones."""
    series = _by_steps(results, _psnr)
    if not series:
        return None
    cap = _cap([y for points in series.values() for _, y in points])
    fig, ax = _figure()
    for (label, points), marker in zip(series.items(), itertools.cycle(MARKERS)):
        ax.plot([x for x, _ in points], [min(y, cap) for _, y in points], marker=marker, label=label)
    _mark_cap(ax, cap, [y for points in series.values() for _, y in points])
    _steps_ticks(ax, series)
    ax.set(xlabel="steps", ylabel="PSNR vs reference (dB)", title="Fidelity vs steps")
    return _svg(fig, ax, "fidelity_vs_steps", legend=len(series) > 1)


def fidelity_vs_time(results: dict) -> str | None:
    """Each cell's median time against its PSNR to the reference; the Pareto front (nothing
    both faster and closer to the reference) highlighted and joined by a step line."""
    cells = [cell for cell in _done(results)
             if _psnr(cell) is not None and (cell.get("time_s") or {}).get("median") is not None]
    if not cells:
        return None
    times = [cell["time_s"]["median"] for cell in cells]
    psnrs = [_psnr(cell) for cell in cells]
    cap = _cap(psnrs)
    shown = [min(p, cap) for p in psnrs]
    fig, ax = _figure()
    ax.scatter(times, shown, color="tab:blue", alpha=0.7, label="cells")
    front = sorted(((t, p, cell) for cell, t, p in zip(cells, times, shown) if cell.get("pareto")),
                   key=lambda point: point[:2])
    if front:
        ax.step([t for t, _, _ in front], [p for _, p, _ in front], where="post", color="tab:red", marker="o",
                markersize=8, markeredgecolor="black", zorder=3, label="Pareto front")
        for t, p, cell in front:   # which settings each point of the front is
            ax.annotate(" · ".join(map(str, cell["values"].values())), (t, p), xytext=(4, -10),
                        textcoords="offset points", fontsize=7, color="tab:red")
    _mark_cap(ax, cap, psnrs)
    if min(times) > 0 and max(times) / min(times) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())   # labelled minor ticks overlap
    ax.set(xlabel="median wall time (s)", ylabel="PSNR vs reference (dB)", title="Fidelity vs time")
    return _svg(fig, ax, "fidelity_vs_time", legend=True)


def memory_by_engine(results: dict) -> str | None:
    """The highest peak memory of each engine as it actually ran (backend/dtype/device)."""
    peaks: dict[str, float] = {}
    kinds: dict[str, str] = {}
    for cell in _done(results):
        if cell.get("peak_memory_mib") is None:
            continue
        engine = cell.get("engine") or {}
        label = f"{cell.get('ran_on') or engine.get('backend')}/{engine.get('dtype')}/{engine.get('device')}"
        peaks[label] = max(peaks.get(label, 0.0), cell["peak_memory_mib"])
        kinds[label] = cell.get("memory_kind") or "rss"
    if not peaks:
        return None
    names = {"rss": "peak RSS", "cuda_allocated": "peak CUDA allocated"}
    mixed = len(set(kinds.values())) > 1
    labels = [f"{label}\n({names.get(kinds[label], kinds[label])})" if mixed else label for label in peaks]
    fig, ax = _figure()
    bars = ax.bar(labels, list(peaks.values()), color="tab:green")
    ax.bar_label(bars, fmt="%.0f")
    ylabel = "peak memory (MiB)" if mixed else f"{names.get(next(iter(kinds.values())), 'peak memory')} (MiB)"
    ax.set(xlabel="engine (backend/dtype/device as run)", ylabel=ylabel, title="Peak memory by engine")
    ax.tick_params(axis="x", labelrotation=20 if len(peaks) > 3 else 0)
    return _svg(fig, ax, "memory_by_engine", legend=False)


def _done(results: dict) -> list[dict]:
    return [cell for cell in results["cells"] if cell.get("status") == "done"]


def _psnr(cell: dict) -> float | None:
    return (((cell.get("fidelity") or {}).get("reference")) or {}).get("psnr")


def _by_steps(results: dict, measure) -> dict[str, list[tuple]]:
    """{label of the other axes' values: [(steps, measure), ...] sorted by steps}, empty when no
    axis sets ``steps`` or nothing was measured."""
    axes = results["study"]["axes"]
    steps = next((axis["name"] for axis in axes if axis.get("input_name") == "steps"), None)
    if steps is None:
        return {}
    others = [axis["name"] for axis in axes if axis["name"] != steps]
    series: dict[str, list[tuple]] = {}
    for cell in _done(results):
        value = measure(cell)
        if value is not None and cell["values"].get(steps) is not None:
            label = ", ".join(f"{name}={cell['values'].get(name)}" for name in others) or "all cells"
            series.setdefault(label, []).append((cell["values"][steps], value))
    return {label: sorted(points) for label, points in series.items()}


def _steps_ticks(ax, series: dict[str, list[tuple]]) -> None:
    ax.set_xticks(sorted({x for points in series.values() for x, _ in points}))


def _cap(values: list[float]) -> float:
    """Where infinite PSNRs are drawn: a little above the highest finite one."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 100.0
    top, bottom = max(finite), min(finite)
    return top + max(3.0, 0.1 * (top - bottom))


def _mark_cap(ax, cap: float, values: list[float]) -> None:
    """A dotted line at the cap, labelled, when some PSNR is infinite."""
    if any(math.isinf(v) for v in values):
        ax.axhline(cap, color="grey", linestyle=":", linewidth=1)
        ax.annotate(INF_LABEL, (0.01, cap), xycoords=("axes fraction", "data"), xytext=(0, 3),
                    textcoords="offset points", color="grey", fontsize=8)
        ax.margins(y=0.1)   # room for the label above the cap


def _figure():
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _svg(fig: Figure, ax, name: str, legend: bool) -> str:
    """The figure as an ``<svg>`` element: text kept as text (selectable, no glyph definitions
    whose ids would repeat across the page's plots), ids salted per plot."""
    if legend:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"kiln-bench-{name}", "svg.id": name}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]
