"""UpscaleModelLoader / ImageUpscaleWithModel and ComfyUI's tiled upscaling."""
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from spandrel import ImageModelDescriptor

from kiln.nodes.models.synthetic_esrgan import write_esrgan
from kiln.nodes.models.upscale_model import tiled_scale, tiled_steps, upscale_image
from kiln.nodes.registry import RunContext
from kiln.nodes.upscale import image_upscale_with_model, upscale_model_loader


class Folder:
    """Stand-in for ModelFolders: every name lives in one directory."""

    def __init__(self, root):
        self.root = root

    def resolve(self, kind, name):
        assert kind == "upscale_models"
        return self.root / name


@pytest.fixture
def ctx(tmp_path):
    return RunContext(models=Folder(tmp_path))


def test_loader_reads_safetensors_and_pth_and_caches(ctx, tmp_path):
    write_esrgan(tmp_path / "x4.safetensors", scale=4)
    write_esrgan(tmp_path / "x2.pth", scale=2, seed=1)
    (x4,) = upscale_model_loader(ctx, model_name="x4.safetensors")
    (x2,) = upscale_model_loader(ctx, model_name="x2.pth")
    assert isinstance(x4, ImageModelDescriptor) and x4.architecture.name == "ESRGAN"
    assert (x4.scale, x2.scale) == (4, 2)
    assert upscale_model_loader(ctx, model_name="x4.safetensors")[0] is x4
    assert not x4.model.training


def test_loader_rejects_unknown_architecture(ctx, tmp_path):
    safetensors.torch.save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match="junk.safetensors: not an upscale model"):
        upscale_model_loader(ctx, model_name="junk.safetensors")


def nearest_x2(a):
    """A pointwise 'model': every output pixel depends on one input pixel only."""
    return F.interpolate(a, scale_factor=2, mode="nearest") * 0.5 + 0.25


def test_tiling_a_pointwise_model_equals_one_call():
    image = torch.rand(2, 3, 37, 53)
    calls = []

    def model(a):
        calls.append(tuple(a.shape[-2:]))
        return nearest_x2(a)

    tiled = tiled_scale(image, model, tile=16, overlap=4, upscale_amount=2)
    assert len(calls) == 2 * tiled_steps(53, 37, 16, 4) == 2 * 3 * 5
    assert torch.allclose(tiled, nearest_x2(image), rtol=0, atol=1e-6)


def test_tile_blend_weights():
    """Tile k returns the constant k: the output is the feather-weighted average of tile ids."""
    image = torch.zeros(1, 3, 24, 41)                 # one tile row; columns 0, 16 and 32 (clamped)
    shapes = []

    def model(a):
        shapes.append(tuple(a.shape[-2:]))
        return torch.full_like(a, float(len(shapes) - 1))

    out = tiled_scale(image, model, tile=24, overlap=8, upscale_amount=1)
    assert shapes == [(24, 24), (24, 24), (24, 9)]

    def ramp(width, x):            # column x of a tile `width` wide: left ramp times right ramp
        return min(1.0, (x + 1) / 8) * min(1.0, (width - x) / 8)

    tiles = [(0, 24), (16, 24), (32, 9)]
    for x in range(41):
        w = [ramp(width, x - start) if start <= x < start + width else 0.0 for start, width in tiles]
        expected = sum(k * wk for k, wk in enumerate(w)) / sum(w)
        assert out[0, 0, 11, x].item() == pytest.approx(expected, abs=1e-6), x


def test_node_upscales_large_image_with_esrgan(ctx, tmp_path):
    write_esrgan(tmp_path / "x4.safetensors", scale=4, num_feat=8)
    (model,) = upscale_model_loader(ctx, model_name="x4.safetensors")
    image = torch.rand(1, 16, 520, 3)                 # wider than the 512 px tile: 2 tiles
    (out,) = image_upscale_with_model(ctx, upscale_model=model, image=image)
    assert out.shape == (1, 64, 2080, 3)
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0.01
    whole = model(image.movedim(-1, 1)).movedim(1, -1)
    # far from the seam (tiles meet at 480..511 px) a tile sees what the whole image sees
    assert torch.allclose(out[:, :, :4 * 440], whole[:, :, :4 * 440], atol=1e-5)
    assert (out - whole).abs().max() < 0.2


def test_small_image_is_one_call_and_alpha_is_resized():
    calls = []

    def model(a):
        calls.append(a.shape)
        return nearest_x2(a) * 4 - 1.5                 # pushes values outside [0, 1]

    image = torch.rand(1, 20, 30, 4)
    out = upscale_image(model, image, scale=2)
    assert calls == [(1, 3, 20, 30)]
    assert out.shape == (1, 40, 60, 4)
    assert torch.equal(out[..., :3], (nearest_x2(image[..., :3].movedim(-1, 1)) * 4 - 1.5)
                       .clamp(0, 1).movedim(1, -1))
    alpha = F.interpolate(image[..., 3:].movedim(-1, 1), size=(40, 60), mode="bilinear").movedim(1, -1)
    assert torch.equal(out[..., 3:], alpha)
