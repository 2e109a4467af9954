"""VAEDecode / VAEEncode / VAEEncodeForInpaint against hand-computed crops, masks and fills."""
import torch
import torch.nn.functional as F

from kiln.nodes.vae import crop_to_multiple, vae_decode, vae_encode, vae_encode_for_inpaint


class FakeVae:
    """8x average-pool 'encoder', nearest 'decoder'; remembers what it was asked to encode."""

    downscale_ratio = 8
    latent_channels = 3

    def __init__(self):
        self.encoded = None

    def encode(self, pixels):
        self.encoded = pixels.clone()
        return F.avg_pool2d(pixels.movedim(-1, 1), 8)

    def decode(self, samples):
        return F.interpolate(samples, scale_factor=8, mode="nearest").movedim(1, -1).clamp(0, 1)


def coded_image(h, w, c=3, batch=1):
    """Pixel (b, y, x, ch) = distinct value, so any crop offset shows."""
    return torch.arange(batch * h * w * c, dtype=torch.float32).reshape(batch, h, w, c) / (batch * h * w * c)


def test_crop_offsets_70x75():
    pixels = coded_image(70, 75)
    cropped = crop_to_multiple(pixels, 8)
    assert cropped.shape == (1, 64, 72, 3)
    assert torch.equal(cropped, pixels[:, 3:67, 1:73, :])
    assert crop_to_multiple(coded_image(64, 72), 8).shape == (1, 64, 72, 3)


def test_vae_encode_crops_and_drops_alpha():
    vae = FakeVae()
    pixels = coded_image(70, 75, c=4, batch=2)
    (latent,) = vae_encode(pixels=pixels, vae=vae)
    assert torch.equal(vae.encoded, pixels[:, 3:67, 1:73, :3])
    assert latent["samples"].shape == (2, 3, 8, 9)
    block = pixels[1, 3 + 8:3 + 16, 1 + 16:1 + 24, :3].mean(dim=(0, 1))
    assert torch.allclose(latent["samples"][1, :, 1, 2], block, atol=1e-6)
    assert set(latent) == {"samples"}


def test_vae_decode_passes_latent():
    vae = FakeVae()
    samples = torch.rand(1, 3, 2, 3)
    (image,) = vae_decode(samples={"samples": samples}, vae=vae)
    assert image.shape == (1, 16, 24, 3)
    assert torch.equal(image[0, 9, 17], samples[0, :, 1, 2])


def grown_reference(mask01, g):
    """noise mask by definition: 1 where any mask pixel lies in the g x g window that
    conv2d(padding=ceil((g-1)/2)) puts at that output position."""
    pad = -(-(g - 1) // 2)
    h, w = mask01.shape
    out = torch.zeros(h, w)
    for y in range(h):
        for x in range(w):
            window = mask01[max(0, y - pad):max(0, y - pad + g), max(0, x - pad):max(0, x - pad + g)]
            out[y, x] = float(window.sum() > 0)
    return out


def test_inpaint_fill_crop_and_grown_mask():
    vae = FakeVae()
    pixels = torch.rand(1, 21, 26, 3)                 # -> 16x24, offsets (2, 1)
    mask = torch.zeros(1, 21, 26)
    mask[0, 9:12, 10:14] = 0.8                          # rounds to 1
    mask[0, 2, 20] = 0.4                                # rounds to 0: neither filled nor grown
    for g in (6, 5, 1, 0):
        (latent,) = vae_encode_for_inpaint(pixels=pixels, vae=vae, mask=mask, grow_mask_by=g)
        crop_px, crop_mask = pixels[:, 2:18, 1:25], mask[0, 2:18, 1:25]
        hard = crop_mask.round()
        expected_px = torch.where(hard[None, :, :, None] == 1, torch.tensor(0.5), crop_px)
        assert torch.equal(vae.encoded, expected_px)
        assert latent["noise_mask"].shape == (1, 1, 16, 24)
        expected_mask = hard if g == 0 else grown_reference(hard, g)
        assert torch.equal(latent["noise_mask"][0, 0], expected_mask), g
    assert latent["samples"].shape == (1, 3, 2, 3)


def test_inpaint_mask_resized_bilinearly_to_pixels():
    vae = FakeVae()
    pixels = torch.rand(2, 16, 16, 4)
    mask = torch.zeros(1, 4, 4)
    mask[0, 1, 1] = 1.0
    (latent,) = vae_encode_for_inpaint(pixels=pixels, vae=vae, mask=mask, grow_mask_by=0)
    up = F.interpolate(mask[None], size=(16, 16), mode="bilinear")[0, 0].round()
    # the 4x4 block under the one mask pixel, minus its corners (0.625**2 rounds to 0)
    assert up.sum() == 12 and up[4:8, 4:8].sum() == 12
    assert torch.equal(latent["noise_mask"][0, 0], up)
    assert torch.equal(vae.encoded[1][up == 1], torch.full((12, 3), 0.5))
    assert torch.equal(vae.encoded[1][up == 0], pixels[1, :, :, :3][up == 0])
