"""The interpreter runs every cell is compared with: its reference and its fp32 baseline at
each seed. Each distinct one runs once, under torch's FLOP counter (the cell's FLOPs are its
baseline's), and is kept in ``references/`` (images and latent) so a resumed study reuses it."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from kiln.bench.engines import InterpreterEngine, RunOutput, Target, copy_image
from kiln.bench.measure import counting_flops, release_memory
from kiln.bench.progress import StudyProgress
from kiln.bench.results import Results
from kiln.bench.study import Cell, Engine, Sample, Study
from kiln.compiler.graph import Graph

FOLDER = "references"


class References:
    def __init__(self, study: Study, results: Results, graphs: dict[str, Graph], target: Target,
                 interpreter: Callable[[Engine], InterpreterEngine]):
        self.study, self.results, self.graphs, self.target = study, results, graphs, target
        self.folder = results.folder
        self._interpreter = interpreter

    def missing(self, cells: list[Cell]) -> list[Sample]:
        """The references and baselines ``cells`` need that are not stored yet."""
        needed: dict[str, Sample] = {}
        for cell in cells:
            for seed in self.study.seeds_or_default():
                for sample in (self.study.reference_sample(cell, seed), self.study.baseline_sample(cell, seed)):
                    needed.setdefault(sample.key, sample)
        return [sample for key, sample in needed.items() if not self._stored(key)]

    def _stored(self, key: str) -> bool:
        record = self.results.reference(key)
        return record is not None and all((self.folder / f).is_file() for f in record["images"])

    def run(self, samples: list[Sample], progress: StudyProgress) -> None:
        for engine in sorted({s.engine for s in samples}, key=lambda e: e.label):
            runner = self._interpreter(engine)
            try:
                for sample in (s for s in samples if s.engine == engine):
                    graph = self.graphs[sample.key]
                    with counting_flops() as flops:
                        out = runner.run(graph, self.target, progress.step)
                    self._store(sample, graph, out, flops.get_total_flops())
                    progress.advance("reference")
            finally:
                runner.close()
                release_memory()

    def _store(self, sample: Sample, graph: Graph, out: RunOutput, flops: int) -> None:
        images = [f"{FOLDER}/{sample.key}_{i}.png" for i in range(len(out.image_files))]
        for source, name in zip(out.image_files, images):
            copy_image(source, self.folder / name)
        latent = None
        if out.latent is not None:
            latent = f"{FOLDER}/{sample.key}.safetensors"
            save_file({"latent": out.latent.contiguous()}, str(self.folder / latent))
        self.results.add_reference(sample.key, {"workflow": graph.source, "engine": sample.engine.as_dict(),
                                                "seed": sample.seed, "flops": flops, "images": images,
                                                "latent": latent})

    def outputs(self, sample: Sample) -> tuple[list[np.ndarray], torch.Tensor | None, int]:
        """(images, latent, FLOPs) of a stored reference run."""
        record = self.results.reference(sample.key)
        images = [np.asarray(Image.open(self.folder / f).convert("RGB")) for f in record["images"]]
        latent = load_file(str(self.folder / record["latent"]))["latent"] if record["latent"] else None
        return images, latent, record["flops"]
