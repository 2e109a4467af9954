"""The VAE: a diffusers ``AutoencoderKL`` built from the file's own shapes, used as ComfyUI's
``comfy/sd.py: VAE`` uses its autoencoder (posterior mean on encode, clamp to [0,1] on decode).

Accepted layouts: LDM (``encoder.down.*``, bare or under ``first_stage_model.``) and diffusers
(``encoder.down_blocks.*``, including the pre-0.14 attention names ``query``/``key``/...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from kiln.nodes.models.detect import (VAE_PREFIX, ModelFileError, check_conversion, converted_state, count_blocks,
                                      describe_keys)
from kiln.nodes.models.manual_cast import cast_on_use, held_dtype

# The autoencoder's modules; other keys (``model_ema.*``, training losses) are not weights of it.
_MODULES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# Attention names of diffusers VAEs saved before the Attention refactor -> current names.
_LEGACY_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


@dataclass(frozen=True)
class VaeConfig:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int

    def diffusers(self) -> dict:
        levels = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
        }


def _ldm_config(sd: dict[str, torch.Tensor]) -> VaeConfig:
    """Shapes of an LDM ``Encoder``/``Decoder`` pair (``ddconfig``: ch, ch_mult, num_res_blocks, z)."""
    levels = count_blocks(sd, "encoder.down.{}.")
    channels = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels))
    layers = count_blocks(sd, "encoder.down.0.block.{}.")
    z = sd["post_quant_conv.weight"].shape[0]
    if sd["decoder.conv_in.weight"].shape[1] != z:
        raise ModelFileError("VAE embed_dim differs from z_channels; not supported")
    if count_blocks(sd, "decoder.up.0.block.{}.") != layers + 1:
        raise ModelFileError("VAE decoder res blocks are not encoder res blocks + 1; not supported")
    return VaeConfig(sd["encoder.conv_in.weight"].shape[1], sd["decoder.conv_out.weight"].shape[0],
                     channels, layers, z)


def _diffusers_config(sd: dict[str, torch.Tensor]) -> VaeConfig:
    levels = count_blocks(sd, "encoder.down_blocks.{}.")
    channels = tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels))
    layers = count_blocks(sd, "encoder.down_blocks.0.resnets.{}.")
    return VaeConfig(sd["encoder.conv_in.weight"].shape[1], sd["decoder.conv_out.weight"].shape[0],
                     channels, layers, sd["post_quant_conv.weight"].shape[0])


def _rename_legacy(key: str) -> str:
    if ".attentions." in key:
        for old, new in _LEGACY_ATTENTION.items():
            key = key.replace("." + old, "." + new)
    return key


def _layout(sd: dict[str, torch.Tensor]) -> tuple[VaeConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, source tensors, diffusers-named tensors) for whichever layout the dict uses."""
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    found = describe_keys(sd)
    sd = {k: v for k, v in sd.items() if k.startswith(_MODULES)}
    try:
        if "encoder.down.0.block.0.conv1.weight" in sd:
            config = _ldm_config(sd)
            return config, sd, convert_ldm_vae_checkpoint(sd, config.diffusers())
        if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
            return _diffusers_config(sd), sd, {_rename_legacy(k): v for k, v in sd.items()}
    except KeyError as e:
        raise ModelFileError(f"incomplete VAE: tensor {e.args[0]!r} is missing") from None
    raise ModelFileError("expected a VAE (keys 'encoder.down.*' / 'decoder.up.*', optionally under "
                         f"'{VAE_PREFIX}', or diffusers 'encoder.down_blocks.*'), found {found}")


class Vae(torch.nn.Module):
    """VAE (``VaeHandle``): NHWC [0,1] pixels <-> raw latents, float32 outputs on the VAE's device.
    Export-safe as written: a plan's compiled VAE stages call these same methods."""

    def __init__(self, model: AutoencoderKL, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self._dtype = dtype   # what it computes in; weights read as fp16 stay fp16 (cast on use)
        self.downscale_ratio = 2 ** (len(model.config.block_out_channels) - 1)
        self.latent_channels = model.config.latent_channels

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior mean after ``quant_conv`` of ``pixels*2-1`` (ComfyUI never samples the posterior)."""
        x = (pixels.movedim(-1, 1) * 2.0 - 1.0).to(self.device, self.dtype)
        moments = self.model.quant_conv(self.model.encoder(x))
        return moments.chunk(2, dim=1)[0].float()

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        z = samples.to(self.device, self.dtype)
        x = self.model.decoder(self.model.post_quant_conv(z)).float()
        return torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).movedim(1, -1)


def build_vae(sd: dict[str, torch.Tensor], *, device="cpu", dtype: torch.dtype = torch.float32) -> Vae:
    """A Vae computing in ``dtype`` from VAE tensors in any accepted layout (a full checkpoint's
    ``first_stage_model.*`` too); empties ``sd``, freeing each file tensor once converted. Weights
    whose cast to ``dtype`` is exact (an fp16 file's) are held as read and cast as each layer runs,
    as ComfyUI's fp32 VAE computes with them."""
    config, source, converted = _layout(sd)
    sd.clear()
    with torch.device("meta"):
        model = AutoencoderKL(**config.diffusers())
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_conversion(source, converted, expected, "VAE")
    model.load_state_dict(converted_state(source, converted, device=device,
                                          dtype=lambda stored: held_dtype(stored, dtype)), strict=True, assign=True)
    return Vae(cast_on_use(model, dtype).eval().requires_grad_(False), dtype)
