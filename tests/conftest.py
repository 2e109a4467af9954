import os
import sys
from pathlib import Path

import pytest

# The repository's top-level folders (kernels/, nodes/, ...) are kiln.* packages, never top-level
# ones: with the checkout on sys.path (``python -m pytest`` puts the working directory first)
# ``kernels/`` would shadow Hugging Face's ``kernels`` package, which transformers imports. Child
# processes the tests start get the same protection (PYTHONSAFEPATH: no working directory first).
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"
sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (minutes of AOTInductor builds; CI runs them)")
    parser.addoption("--full-size", action="store_true", default=False,
                     help="also run tests marked full_size (real SD1.5-size models, GBs of memory)")
    parser.addoption("--ray", action="store_true", default=False,
                     help="also run tests marked ray (kiln serve --ray on a local Ray cluster; needs kiln[ray])")


def pytest_collection_modifyitems(config, items):
    skips = {marker: pytest.mark.skip(reason=f"{marker}: run with {option}")
             for marker, option in (("slow", "--runslow"), ("full_size", "--full-size"), ("ray", "--ray"))
             if not config.getoption(option)}
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def artifact_cache_dir(request, tmp_path_factory) -> Path:
    """Where tests keep compiled test artifacts: pytest's cache folder, so they survive between
    runs, or a session folder when the cache plugin is off (``-p no:cacheprovider``)."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return tmp_path_factory.mktemp("kiln-tiny-aoti")
    return Path(cache.mkdir("kiln-tiny-aoti"))


@pytest.fixture(scope="session")
def compiled_cache(tmp_path_factory) -> Path:
    """A compiled-artifact cache (``Settings.cache_dir``) the session's plans share."""
    return tmp_path_factory.mktemp("kiln-compiled")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """A ComfyUI-layout models folder with tiny random-weight checkpoints and an ESRGAN."""
    from kiln.demo import write_demo_models
    from kiln.nodes.models.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("models")
    write_demo_models(root)
    checkpoints = root / "checkpoints"
    write_checkpoint(checkpoints / "tiny-sd2-v.safetensors", "sd2", size="tiny", seed=1, v_prediction=True)
    write_checkpoint(checkpoints / "tiny-sdxl.safetensors", "sdxl", size="tiny", seed=2)
    write_checkpoint(checkpoints / "tiny-sd15-inpainting.safetensors", "sd1", size="tiny", seed=3,
                     inpainting=True)
    return root


@pytest.fixture(scope="session")
def input_dir(tmp_path_factory):
    """ComfyUI's input folder with an RGB and an RGBA test image."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("input")
    yy, xx = np.mgrid[0:72, 0:80]
    rgb = np.stack([(xx * 3) % 256, (yy * 3) % 256, ((xx + yy) * 2) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(root / "input.png")
    alpha = np.full((72, 80), 255, np.uint8)
    alpha[20:50, 24:56] = 0   # the transparent hole is what gets inpainted
    Image.fromarray(np.dstack([rgb, alpha])).save(root / "rgba.png")
    return root
