"""The report of a study, finished or stopped: grids, plots and the page that shows them, all
written into the study's folder next to results.json and the cells' images. The runner calls it
at the end of a study and when the user stops one, so a partial study has a report too."""
from __future__ import annotations

from pathlib import Path

from kiln.bench import plots
from kiln.bench.grid import write_grids
from kiln.bench.page import write_page

PLOTS = (("Wall time vs steps", plots.time_vs_steps),
         ("Fidelity vs time", plots.fidelity_vs_time),
         ("Fidelity vs steps", plots.fidelity_vs_steps),
         ("Peak memory by engine", plots.memory_by_engine))


def write_report(results: dict, folder: Path) -> Path:
    """Write the grids and ``index.html`` into ``folder``; return the page's path."""
    folder = Path(folder)
    grids = write_grids(results, folder)
    figures = {heading: svg for heading, plot in PLOTS if (svg := plot(results)) is not None}
    return write_page(results, folder, grids, figures)
