"""``kiln demo``: tiny random-weight models in ComfyUI's folder layout, then the HiRes-fix example.

Nothing can be downloaded here, so the demo writes its own single-file SD1.5-layout
checkpoint and ESRGAN upscaler (random weights: the image is noise-like, the pipeline is real).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

HIRES_FIX = "hires_fix.json"


def example_workflow(name: str = HIRES_FIX) -> dict:
    return json.loads(resources.files("kiln.examples").joinpath(name).read_text())


def write_demo_models(models_dir: Path) -> None:
    from kiln.nodes.models.synthetic import write_checkpoint
    from kiln.nodes.models.synthetic_esrgan import write_esrgan

    checkpoint = models_dir / "checkpoints" / "tiny-sd15.safetensors"
    upscaler = models_dir / "upscale_models" / "tiny-esrgan-x4.safetensors"
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(checkpoint, "sd1", size="tiny", seed=0)
    if not upscaler.exists():
        upscaler.parent.mkdir(parents=True, exist_ok=True)
        write_esrgan(upscaler, scale=4, seed=0)


def run_demo(directory: Path, progress: bool = True) -> list[str]:
    from kiln.api import run_workflow
    from kiln.progress import ProgressBars, timing_summary

    models = directory / "models"
    write_demo_models(models)
    workflow = example_workflow()
    (directory / HIRES_FIX).write_text(json.dumps(workflow, indent=2))
    with ProgressBars() as bars:
        result = run_workflow(workflow, models=models, output_dir=directory / "out",
                              progress=bars.node_step if progress else None)
    if progress:
        print(timing_summary(result.timings))
    return result.saved
