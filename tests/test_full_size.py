"""HiRes fix on a full-size SD1.5-architecture checkpoint (random weights, ~2 GB): run with --full-size."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kiln.api import run_workflow
from kiln.nodes.models.synthetic import write_checkpoint
from kiln.nodes.models.synthetic_esrgan import write_esrgan
from workflows import hires_fix


@pytest.mark.full_size
def test_hires_fix_full_size_sd15(tmp_path):
    models = tmp_path / "models"
    write_checkpoint(models / "checkpoints" / "tiny-sd15.safetensors", "sd1", size="full", seed=0)
    write_esrgan(models / "upscale_models" / "tiny-esrgan-x4.safetensors", scale=4, seed=0)
    wf = hires_fix()
    wf["5"]["inputs"].update(width=128, height=128)
    wf["3"]["inputs"]["steps"] = 3
    wf["14"]["inputs"]["steps"] = 2
    result = run_workflow(wf, models=models, output_dir=tmp_path / "out")
    image = np.asarray(Image.open(result.saved[0]))
    assert image.shape == (256, 256, 3) and image.std() > 1


@pytest.mark.full_size
def test_hires_fix_full_size_onnx_plan(tmp_path):
    """The same chain at full size (SD1.5 UNet/VAE/CLIP, 23-block ESRGAN x4) as an ONNX plan with a
    runtime prompt, against the interpreter."""
    from kiln.compiler.pipeline import compile_workflow
    from kiln.kernels.settings import Settings
    from plan_parity import LONG_PROMPT, assert_parity

    models = tmp_path / "models"
    write_checkpoint(models / "checkpoints" / "tiny-sd15.safetensors", "sd1", size="full", seed=0)
    write_esrgan(models / "upscale_models" / "tiny-esrgan-x4.safetensors", scale=4, num_feat=64, num_block=23)
    wf = hires_fix()
    wf["5"]["inputs"].update(width=128, height=128)
    wf["3"]["inputs"]["steps"] = 3
    wf["14"]["inputs"]["steps"] = 2
    plan = compile_workflow(wf, models=models, inputs=["6.text"], backend="onnx", output=tmp_path / "hires.plan",
                            settings=Settings(cache_dir=tmp_path / "cache"))
    assert_parity(wf, plan, tmp_path, models, None, {"6.text": LONG_PROMPT})
