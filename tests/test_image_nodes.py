"""LoadImage / SaveImage / PreviewImage / ImageScale(By) and the resize methods behind them."""
import json
import math
import os
import re
from datetime import datetime

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.nodes.image import image_scale, image_scale_by, load_image, load_image_mask, preview_image, save_image
from kiln.nodes.registry import RunContext
from kiln.nodes.resize import common_upscale
from kiln.runtime.images import expand_tokens, save_image_path


@pytest.fixture
def ctx(tmp_path):
    (tmp_path / "in").mkdir()
    return RunContext(input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
                      prompt={"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}},
                      extra_pnginfo={"workflow": {"nodes": [1, 2]}})


# ---- LoadImage -------------------------------------------------------------------------------

def test_load_rgba_image_and_mask(ctx):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(os.path.join(ctx.input_dir, "a.png"))
    img, mask = load_image(ctx, image="a.png")
    assert img.shape == (1, 5, 7, 3) and img.dtype == torch.float32
    assert mask.shape == (1, 5, 7)
    assert torch.equal(img[0], torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0))
    assert torch.equal(mask[0], 1.0 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0))


def test_load_rgb_image_gives_64x64_zero_mask(ctx):
    Image.new("RGB", (9, 4), (255, 128, 0)).save(os.path.join(ctx.input_dir, "b.png"))
    img, mask = load_image(ctx, image="b.png")
    assert img.shape == (1, 4, 9, 3)
    assert img[0, 0, 0].tolist() == [1.0, np.float32(128) / np.float32(255), 0.0]
    assert torch.equal(mask, torch.zeros(1, 64, 64))


def test_load_applies_exif_orientation(ctx):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90 CW to display"
    Image.fromarray(pixels).save(os.path.join(ctx.input_dir, "r.png"), exif=exif)
    img, _ = load_image(ctx, image="r.png")
    expected = np.rot90(pixels, k=-1).astype(np.float32) / 255.0
    assert torch.equal(img[0], torch.from_numpy(expected.copy()))


def test_load_multiframe_batches_equal_sized_frames(ctx):
    frames = [Image.new("RGB", (6, 4), (10 * k, 0, 0)) for k in range(3)] + [Image.new("RGB", (5, 5))]
    path = os.path.join(ctx.input_dir, "m.tiff")
    frames[0].save(path, save_all=True, append_images=frames[1:])
    img, mask = load_image(ctx, image="m.tiff")
    assert img.shape == (3, 4, 6, 3) and mask.shape == (3, 64, 64)
    assert [round(float(v) * 255) for v in img[:, 0, 0, 0]] == [0, 10, 20]


def test_load_mode_i_is_scaled_by_255(ctx):
    values = np.array([[0, 255 * 3, 255 * 200, 255 * 300]], dtype=np.int32)
    Image.fromarray(values).save(os.path.join(ctx.input_dir, "i.tiff"))
    img, _ = load_image(ctx, image="i.tiff")
    assert [round(float(v) * 255) for v in img[0, 0, :, 1]] == [0, 3, 200, 255]


def test_load_image_mask_channels(ctx):
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 51, 204
    Image.fromarray(rgba, "RGBA").save(os.path.join(ctx.input_dir, "k.png"))
    (red,) = load_image_mask(ctx, image="k.png", channel="red")
    (alpha,) = load_image_mask(ctx, image="k.png", channel="alpha")
    assert red.shape == (1, 3, 4) and torch.all(red == np.float32(51) / np.float32(255))
    assert torch.all(alpha == 1.0 - np.float32(204) / np.float32(255))


# ---- SaveImage / PreviewImage ----------------------------------------------------------------

def test_save_image_names_counter_chunks_and_truncation(ctx):
    os.makedirs(ctx.output_dir)
    for name in ("pic_00007_.png", "pic_00003_.png", "pic_x_.png", "picture_00050_.png", "other_00099_.png"):
        open(os.path.join(ctx.output_dir, name), "wb").close()
    images = torch.tensor([0.0, 0.5, 0.999, 1.2, -0.1, 0.2]).reshape(1, 1, 2, 3).repeat(2, 3, 1, 1)
    images[1] = 1.0 - images[1]
    saved = save_image(ctx, images=images, filename_prefix="pic").images
    assert [image.ui() for image in saved] == [{"filename": f"pic_0000{i}_.png", "subfolder": "", "type": "output"}
                                               for i in (8, 9)]
    for path, img in zip([image.path for image in saved], images):
        with Image.open(path) as png:
            assert png.text["prompt"] == json.dumps(ctx.prompt)
            assert png.text["workflow"] == json.dumps(ctx.extra_pnginfo["workflow"])
            decoded = np.array(png)
        assert decoded.shape == (3, 2, 3)
        # truncation: 127.5 -> 127, 254.745 -> 254, out of range clipped
        assert np.array_equal(decoded, np.floor(np.clip(255.0 * img.numpy(), 0, 255)).astype(np.uint8))
    assert decoded[0, 0].tolist() == [255, 127, 0]
    assert not [f for f in os.listdir(ctx.output_dir) if f.startswith(".")]


def test_save_image_subfolder_and_tokens(ctx):
    saved = [image for _ in range(2) for image in
             save_image(ctx, images=torch.zeros(1, 4, 6, 3), filename_prefix="runs/%width%x%height%/img").images]
    assert [image.path for image in saved] == [os.path.join(ctx.output_dir, "runs", "6x4", f"img_0000{i}_.png")
                                               for i in (1, 2)]
    assert {image.subfolder for image in saved} == {os.path.join("runs", "6x4")}
    with pytest.raises(ValueError, match="outside the output folder"):
        save_image(ctx, images=torch.zeros(1, 4, 6, 3), filename_prefix="../escape")


def test_date_tokens():
    now = datetime(2024, 3, 7, 9, 5, 2)
    assert expand_tokens("%date:yyyy-MM-dd%/a_%date:hhmmss%_%date:yy.M.d%", 1, 1, now) == \
        "2024-03-07/a_090502_24.3.7"
    assert expand_tokens("%year%%month%_%NodeTitle.seed%", 1, 1, now) == "202403_%NodeTitle.seed%"


def test_save_failure_leaves_no_file(ctx, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image(ctx, images=torch.zeros(1, 2, 2, 3), filename_prefix="pic")
    assert os.listdir(ctx.output_dir) == []


def test_preview_goes_to_hidden_folder(ctx):
    previews = preview_image(ctx, images=torch.full((2, 3, 3, 3), 0.25)).images
    assert [(image.type, image.subfolder) for image in previews] == [("temp", "")] * 2
    paths = [image.path for image in previews]
    for i, path in enumerate(paths):
        assert os.path.dirname(path) == os.path.join(ctx.output_dir, ".preview")
        assert re.fullmatch(rf"ComfyUI_temp_[a-z]{{5}}_0000{i + 1}_\.png", os.path.basename(path))
        with Image.open(path) as png:
            assert np.array(png)[0, 0].tolist() == [63, 63, 63]
    assert save_image_path("ComfyUI", ctx.output_dir)[2] == 1


# ---- ImageScale / ImageScaleBy / resize methods ----------------------------------------------

def test_image_scale_keeps_aspect_and_crops_center():
    image = torch.rand(2, 10, 20, 3)
    (half,) = image_scale(image=image, upscale_method="nearest-exact", width=0, height=5, crop="disabled")
    assert torch.equal(half, image[:, 1::2, 1::2])     # nearest-exact /2 samples odd pixels
    (square,) = image_scale(image=image, upscale_method="nearest-exact", width=5, height=5, crop="center")
    assert torch.equal(square, image[:, 1::2, 6:15:2])  # 5 columns cut on each side first
    (same,) = image_scale(image=image, upscale_method="bilinear", width=0, height=0, crop="center")
    assert same is image


def test_image_scale_by_rounds_like_python():
    image = torch.rand(1, 11, 13, 3)
    (out,) = image_scale_by(image=image, upscale_method="area", scale_by=0.5)
    assert out.shape == (1, 6, 6, 3)                   # round(5.5) = 6, round(6.5) = 6
    (up,) = image_scale_by(image=image, upscale_method="nearest-exact", scale_by=2.0)
    assert torch.equal(up[:, ::2, ::2], image) and torch.equal(up[:, 1::2, 1::2], image)


def test_lanczos_matches_pil_on_8bit_pixels():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(2, 9, 14, 3), dtype=np.uint8)
    samples = torch.from_numpy(pixels.astype(np.float32) / 255.0).movedim(-1, 1)
    out = common_upscale(samples, 20, 13, "lanczos", "disabled")
    assert out.shape == (2, 3, 13, 20)
    for k in range(2):
        expected = np.array(Image.fromarray(pixels[k]).resize((20, 13), Image.Resampling.LANCZOS))
        assert torch.equal(out[k], torch.from_numpy(expected.astype(np.float32) / 255.0).movedim(-1, 0))
    assert common_upscale(samples[:, :1], 5, 4, "lanczos", "disabled").shape == (2, 1, 4, 5)
    assert common_upscale(torch.rand(1, 4, 8, 8), 5, 4, "lanczos", "center").shape == (1, 4, 4, 5)


def test_bislerp_slerps_channel_vectors():
    # two pixels: unit vector at angle 0, length-3 vector at angle pi/2
    samples = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).T.reshape(1, 2, 1, 2)
    out = common_upscale(samples, 4, 1, "bislerp", "disabled")
    assert out.shape == (1, 2, 1, 4)
    # output x samples source x = 0, 0.25, 0.75, 1 (half-pixel centres, clamped edges)
    for x, r in enumerate([0.0, 0.25, 0.75, 1.0]):
        norm, angle = 1 + 2 * r, r * math.pi / 2
        expected = torch.tensor([norm * math.cos(angle), norm * math.sin(angle)])
        assert torch.allclose(out[0, :, 0, x], expected, atol=1e-6), x
    latent = torch.randn(2, 4, 5, 7)
    assert common_upscale(latent, 11, 9, "bislerp", "center").shape == (2, 4, 9, 11)
    assert torch.allclose(common_upscale(latent, 7, 5, "bislerp", "disabled"), latent, atol=1e-6)
