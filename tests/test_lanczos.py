"""The compiled lanczos resize equals ComfyUI's PIL round trip bit for bit, and exports."""
import pytest
import torch

from kiln.kernels.lanczos import coefficients, pil_lanczos
from kiln.nodes.resize import lanczos


@pytest.mark.parametrize("size, out", [((64, 64), (128, 128)), ((100, 77), (50, 39)), ((64, 96), (64, 200)),
                                       ((33, 65), (300, 17)), ((128, 128), (64, 64)), ((40, 40), (40, 40))])
@pytest.mark.parametrize("channels", [1, 3])
def test_equals_pil(size, out, channels):
    x = torch.rand(2, channels, *size, generator=torch.Generator().manual_seed(sum(size) + channels))
    x[0, :, 0, 0] = 1.5   # out of range values are clipped first, as ComfyUI's np.clip does
    assert torch.equal(pil_lanczos(x, out[1], out[0]), lanczos(x, out[1], out[0]))


def test_coefficients_are_normalised_fixed_point():
    matrix = coefficients(100, 37)
    assert matrix.shape == (37, 100) and torch.equal(matrix, matrix.round())
    taps = (matrix != 0).sum(-1)
    assert ((matrix.sum(-1) - 2 ** 22).abs() <= taps).all()   # each tap rounded, around 1.0 in all
    assert taps.max() <= 2 * 3 * 100 / 37 + 1   # the lanczos window: 3 source pixels per side, scaled


def test_exports_with_concrete_sizes():
    class Resize(torch.nn.Module):
        def forward(self, x):
            return pil_lanczos(x, 50, 30)

    x = torch.rand(1, 3, 40, 64)
    exported = torch.export.export(Resize(), (x,))
    assert torch.equal(exported.module()(x), lanczos(x, 50, 30))
