"""The XYZ image grids of a study: one PNG per page (a z value and the values of the extra axes),
x values as columns, y values as rows, each cell's first-seed image scaled to a common box. The
report's page lays an image map over each grid, so every cell's rectangle is returned with it."""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from kiln.bench.study import safe_file_stem

MAX_SIDE = 256   # thumbnails fit this box ...
MIN_SIDE = 128   # ... and small images (the tiny test models' 64 px) are enlarged to at least this
GAP = 4
MARGIN = 12
ROW_LABEL_MAX = 180
LABEL_FONT = ImageFont.load_default(size=14)
TITLE_FONT = ImageFont.load_default(size=18)
MARK_FONT = ImageFont.load_default(size=12)
INK, GREY, PLACEHOLDER, MARK = (20, 20, 20), (90, 90, 90), (205, 205, 205), (200, 40, 40)

# (x0, y0, x1, y1, cell name, href relative to the report folder or None when the cell has no image)
Area = tuple[int, int, int, int, str, str | None]


@dataclass(frozen=True)
class Grid:
    file: str            # the PNG, relative to the report folder
    title: str
    areas: list[Area]    # one per cell, in the PNG's pixel coordinates


def write_grids(results: dict, folder: Path) -> list[Grid]:
    """Draw every page of the study into ``folder`` (``grid.png``, or ``grid_<page label>.png``
    when there are z or extra axes) and return them in page order."""
    folder = Path(folder)
    study = results["study"]
    axes = study["axes"]
    names = [axis["name"] for axis in axes]
    cells = {tuple(cell["values"].get(name) for name in names): cell for cell in results["cells"]}
    images = {cell["name"]: _thumbnail(folder, cell) for cell in results["cells"]}
    loaded = [image for image in images.values() if image is not None]
    box = (max((i.width for i in loaded), default=MIN_SIDE), max((i.height for i in loaded), default=MIN_SIDE))

    columns = _choices(axes, "x")
    rows = _choices(axes, "y")
    paged = [axis for axis in axes if axis["role"] == "z"] + [axis for axis in axes if axis["role"] == "extra"]
    grids, taken = [], set()
    for page in itertools.product(*[axis["values"] for axis in paged]):
        fixed = {axis["name"]: value for axis, value in zip(paged, page)}
        file = f"{safe_file_stem('grid_' + '_'.join(map(str, page)), taken)}.png" if paged else "grid.png"
        title = ", ".join(f"{name}={value}" for name, value in fixed.items()) or study["workflow_file"]
        grid_cells = [[cells.get(tuple({**fixed, **column, **row}.get(name) for name in names))
                       for _, column in columns] for _, row in rows]
        canvas, areas = _draw(title, [label for label, _ in columns], [label for label, _ in rows],
                              grid_cells, images, box)
        canvas.save(folder / file)
        grids.append(Grid(file=file, title=title, areas=areas))
    return grids


def _choices(axes: list[dict], role: str) -> list[tuple[str, dict]]:
    """The (label, {axis name: value}) choices of the axis with ``role`` (x or y); one unlabelled
    choice when the study has no such axis."""
    axis = next((axis for axis in axes if axis["role"] == role), None)
    if axis is None:
        return [("", {})]
    return [(f"{axis['name']}={value}", {axis["name"]: value}) for value in axis["values"]]


def _thumbnail(folder: Path, cell: dict) -> Image.Image | None:
    """The cell's image fitted to MAX_SIDE (sharp integer enlargement of small ones), or None
    when the cell did not run or its file is missing (a study stopped midway)."""
    if cell.get("status") != "done" or not cell.get("image") or not (folder / cell["image"]).is_file():
        return None
    with Image.open(folder / cell["image"]) as opened:
        image = opened.convert("RGB")
    side = max(image.size)
    if side > MAX_SIDE:
        scale = MAX_SIDE / side
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                            Image.Resampling.LANCZOS)
    factor = min(math.ceil(MIN_SIDE / side), MAX_SIDE // side) if side < MIN_SIDE else 1
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _draw(title: str, column_labels: list[str], row_labels: list[str], grid_cells: list[list[dict | None]],
          images: dict[str, Image.Image | None], box: tuple[int, int]) -> tuple[Image.Image, list[Area]]:
    """One page: the title, the column labels over the cells, the row labels left of them, each
    cell centred in a ``box``-sized slot (labels wrapped and cut to their room, never wider)."""
    width, height = box
    line = _line_height(LABEL_FONT)
    column_lines = [_wrap(label, LABEL_FONT, width, 2) for label in column_labels]
    header = max(len(lines) for lines in column_lines) * line
    label_width = min(ROW_LABEL_MAX, max(int(LABEL_FONT.getlength(label)) for label in row_labels))
    row_lines = [_wrap(label, LABEL_FONT, label_width, max(1, height // line)) for label in row_labels]
    left = MARGIN + (label_width + GAP if label_width else 0)
    body_width = len(column_labels) * (width + GAP) - GAP
    title_lines = _wrap(title, TITLE_FONT, left - MARGIN + body_width, 2)
    top = MARGIN + len(title_lines) * _line_height(TITLE_FONT) + GAP + (header + GAP if header else 0)

    canvas = Image.new("RGB", (left + body_width + MARGIN, top + len(row_labels) * (height + GAP) - GAP + MARGIN),
                       "white")
    draw = ImageDraw.Draw(canvas)
    _text(draw, (MARGIN, MARGIN), title_lines, TITLE_FONT, INK)
    for c, lines in enumerate(column_lines):
        _text(draw, (left + c * (width + GAP), top - GAP - header), lines, LABEL_FONT, GREY)
    areas = []
    for r, row in enumerate(grid_cells):
        y = top + r * (height + GAP)
        _text(draw, (MARGIN, y), row_lines[r], LABEL_FONT, GREY)
        for c, cell in enumerate(row):
            x = left + c * (width + GAP)
            image = images.get(cell["name"]) if cell is not None else None
            if image is None:
                draw.rectangle((x, y, x + width - 1, y + height - 1), fill=PLACEHOLDER)
                _centered(draw, (x, y, width, height), "not run", LABEL_FONT, GREY)
            else:
                canvas.paste(image, (x + (width - image.width) // 2, y + (height - image.height) // 2))
                if cell.get("fallback"):
                    _fallback_mark(draw, (x, y, width, height), f"{cell.get('ran_on')}: fallback")
            if cell is not None:
                areas.append((x, y, x + width, y + height, cell["name"], cell["image"] if image is not None else None))
    return canvas, areas


def _fallback_mark(draw: ImageDraw.ImageDraw, rect: tuple[int, int, int, int], text: str) -> None:
    """A red band across the bottom of the cell: this engine did not serve it, another backend did."""
    x, y, width, height = rect
    band = _line_height(MARK_FONT) + 4
    draw.rectangle((x, y + height - band, x + width - 1, y + height - 1), fill=MARK)
    _centered(draw, (x, y + height - band, width, band), text, MARK_FONT, "white")


def _centered(draw: ImageDraw.ImageDraw, rect: tuple[int, int, int, int], text: str,
              font: ImageFont.FreeTypeFont, fill) -> None:
    x, y, width, height = rect
    text = _wrap(text, font, width - 4, 1)[0]
    draw.text((x + width / 2, y + height / 2), text, font=font, fill=fill, anchor="mm")


def _text(draw: ImageDraw.ImageDraw, at: tuple[int, int], lines: list[str], font: ImageFont.FreeTypeFont,
          fill) -> None:
    x, y = at
    for i, line in enumerate(lines):
        draw.text((x, y + i * _line_height(font)), line, font=font, fill=fill)


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + 2


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """``text`` in at most ``max_lines`` lines no wider than ``width``: broken after spaces,
    commas, ``=`` and ``_`` where possible, else anywhere; what does not fit ends in an ellipsis."""
    lines = [""]
    for piece in re.findall(r"[^ ,=_]*[ ,=_]?", text):
        while piece:
            if font.getlength(lines[-1] + piece) <= width:
                lines[-1] += piece
                piece = ""
            elif lines[-1]:
                lines.append("")
            else:   # a piece wider than a whole line: split it where it stops fitting
                cut = max(1, next(i for i in range(1, len(piece) + 1) if font.getlength(piece[:i]) > width) - 1)
                lines[-1], piece = piece[:cut], piece[cut:]
                lines.append("")
    lines = [line.rstrip() for line in lines if line.strip()]
    if len(lines) <= max_lines:
        return lines
    last = lines[max_lines - 1]
    while last and font.getlength(last + "…") > width:
        last = last[:-1]
    return lines[:max_lines - 1] + [last + "…"]
