"""How far a cell's output is from another run's: PSNR and SSIM of the decoded images as saved
(8-bit), and the RMSE of the latents they were decoded from.

SSIM is scikit-image's with the Gaussian window of Wang et al. (sigma 1.5, population
statistics): the figure papers and other tools report.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def compare(images: list[np.ndarray], reference: list[np.ndarray], latents: list[torch.Tensor | None],
            reference_latents: list[torch.Tensor | None]) -> dict[str, float | None]:
    """``psnr`` (dB over every image, inf when identical), ``ssim`` (the mean over images) and
    ``latent_rmse`` (over every latent) of a cell's samples against the reference's, sample by
    sample; None where something is missing or the shapes differ (a reference at another size)."""
    result: dict[str, float | None] = {"psnr": None, "ssim": None, "latent_rmse": None}
    if images and len(images) == len(reference) and all(a.shape == b.shape for a, b in zip(images, reference)):
        a, b = np.stack(images), np.stack(reference)
        result["psnr"] = math.inf if np.array_equal(a, b) else \
            float(peak_signal_noise_ratio(b, a, data_range=255))
        result["ssim"] = float(np.mean([_ssim(x, y) for x, y in zip(images, reference)]))
    pairs = list(zip(latents, reference_latents))
    if pairs and all(x is not None and y is not None and x.shape == y.shape for x, y in pairs):
        squares = torch.cat([((x.double() - y.double()) ** 2).flatten() for x, y in pairs])
        result["latent_rmse"] = float(torch.sqrt(squares.mean()))
    return result


def _ssim(image: np.ndarray, reference: np.ndarray) -> float:
    if np.array_equal(image, reference):
        return 1.0
    side = min(image.shape[:2])
    return float(structural_similarity(reference, image, data_range=255, channel_axis=-1, gaussian_weights=True,
                                       sigma=1.5 if side >= 11 else (side - 1) / 7, use_sample_covariance=False))
