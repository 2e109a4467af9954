"""The denoising UNet: a diffusers ``UNet2DConditionModel`` built from the checkpoint's own shapes,
called the way ComfyUI's ``BaseModel._apply_model`` calls its UNet.

SDXL's ``y`` vector: ComfyUI feeds it to ``label_emb`` (Linear-SiLU-Linear) and adds the result to
the time embedding.  diffusers' ``text_time`` path would rebuild that vector from
``text_embeds``/``time_ids`` with its own embedding width; the ``projection`` class embedding is
the same Linear-SiLU-Linear added to the same place, so kiln uses it and passes ``y`` verbatim.
"""
from __future__ import annotations

import copy

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from kiln.kernels.model_sampling import ModelSamplingDiscrete, nearest_timestep
from kiln.kernels.sdxl import sdxl_vector
from kiln.nodes.models.detect import (UNET_PREFIX, ModelFileError, ModelInfo, check_conversion, converted_state,
                                      storage_key)
from kiln.kernels.lora import Adapter
from kiln.nodes.models.lora_keys import UNET_KEY_PREFIX, unet_lora_keys
from kiln.nodes.models.patching import PatchedWeights


def _level_depths(per_block: tuple[int, ...], blocks_per_level: int, levels: int) -> list[list[int]]:
    return [list(per_block[i * blocks_per_level:(i + 1) * blocks_per_level]) for i in range(levels)]


def _attention_levels(depths: list[list[int]]) -> list[bool]:
    """Which levels have transformers; diffusers cannot mix blocks with and without one in a level."""
    flags = [any(d) for d in depths]
    if any(f and not all(d) for f, d in zip(flags, depths)):
        raise ModelFileError(f"transformer depths per level {depths} mix blocks with and without "
                             "attention; not supported")
    return flags


def diffusers_config(info: ModelInfo) -> dict:
    """The ``UNet2DConditionModel`` config equivalent to ComfyUI's ``UNetModel(**unet_config)``."""
    u = info.unet
    levels = len(u.channel_mult)
    if len(set(u.num_res_blocks)) != 1:
        raise ModelFileError(f"res blocks per level differ ({list(u.num_res_blocks)}); not supported")
    n_res = u.num_res_blocks[0]
    down = _level_depths(u.transformer_depth, n_res, levels)
    # ComfyUI lists output depths from the shallowest level; diffusers builds up blocks deepest first.
    up = _level_depths(u.transformer_depth_output, n_res + 1, levels)[::-1]
    attention = _attention_levels(down)
    if _attention_levels(up)[::-1] != attention:
        raise ModelFileError(f"input depths {list(u.transformer_depth)} and output depths "
                             f"{list(u.transformer_depth_output)} put attention on different levels")
    # diffusers takes the middle block's depth from the last level's entry.
    if attention[-1] and down[-1][0] != u.transformer_depth_middle:
        raise ModelFileError(f"middle block depth {u.transformer_depth_middle} differs from the last level's "
                             f"{down[-1][0]}; not supported")
    if not attention[-1]:
        down[-1] = [u.transformer_depth_middle] * n_res
    channels = [u.model_channels * m for m in u.channel_mult]
    for c, attends in zip(channels, attention[:-1] + [True]):  # the middle block attends at the last width
        if attends and (info.heads(c) < 1 or c % info.heads(c)):
            raise ModelFileError(f"a {c}-channel transformer does not split into {info.arch}'s attention heads")
    adm = u.adm_in_channels
    return {
        "sample_size": 64,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]],
        "block_out_channels": channels,
        "layers_per_block": n_res,
        "cross_attention_dim": u.context_dim,
        # diffusers' historical misnomer: this is the number of heads per block.
        "attention_head_dim": [info.heads(c) for c in channels],
        "use_linear_projection": u.use_linear_in_transformer,
        "transformer_layers_per_block": down,
        "reverse_transformer_layers_per_block": up,
        "class_embed_type": "projection" if adm is not None else None,
        "projection_class_embeddings_input_dim": adm,
        # SD2 asks for fp32 attention (ComfyUI attn_precision); a no-op in fp32.
        "upcast_attention": info.arch == "sd2",
    }


def build_unet(sd: dict[str, torch.Tensor], info: ModelInfo, *, device="cpu",
               dtype: torch.dtype = torch.float32) -> tuple[UNet2DConditionModel, dict[str, str]]:
    """The diffusers UNet holding the checkpoint's ``model.diffusion_model.*`` weights (strict),
    taken out of ``sd``, and which of its parameters each LDM name (ComfyUI's ``diffusion_model.*``
    key) became."""
    config = diffusers_config(info)
    source = {k: sd.pop(k) for k in list(sd) if k.startswith(UNET_PREFIX)}
    converted = convert_ldm_unet_checkpoint(source, config)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    expected = {k: v.shape for k, v in unet.state_dict().items()}
    check_conversion(source, converted, expected, "UNet")
    module_name = {storage_key(v): k for k, v in converted.items()}
    ldm_names = {UNET_KEY_PREFIX + k[len(UNET_PREFIX):]: module_name[storage_key(v)] for k, v in source.items()}
    unet.load_state_dict(converted_state(source, converted, device=device, dtype=dtype), strict=True, assign=True)
    return unet.eval().requires_grad_(False), ldm_names


class DiffusionModel(torch.nn.Module):
    """MODEL: the UNet plus its parameterisation (``DiffusionModelHandle``). ``apply_model`` is
    export-safe: a plan's compiled denoiser calls it too (kiln.compiler.lower.denoiser)."""

    def __init__(self, unet: UNet2DConditionModel, info: ModelInfo, ldm_names: dict[str, str]):
        super().__init__()
        self._modules["unet"] = unet     # read through the `unet` property, which applies the patches
        self.weights = PatchedWeights(unet, ldm_names)   # LoRA patches, keyed by ComfyUI's names
        self.ip_adapters: tuple = ()                     # IPAdapterPatch, in application order
        self._call_state = None                          # what the IP-Adapter attentions read per call
        self._patches_pending = False
        self.info = info
        self.arch = info.arch
        self.model_sampling = ModelSamplingDiscrete(info.prediction)
        self.latent_format = info.latent_format
        self.in_channels = info.unet.in_channels
        # The timestep table as a buffer, so an exported denoiser carries it as a weight.
        self.register_buffer("log_sigmas", self.model_sampling.log_sigmas.clone())

    @property
    def unet(self) -> UNet2DConditionModel:
        """The UNet with this handle's weight patches applied (computed on first use)."""
        if self._patches_pending:
            module = self.weights.module()
            if self.ip_adapters:
                from kiln.nodes.models.ip_attention import CallState, install

                self._call_state = CallState()
                module = install(module, self.ip_adapters, self.arch == "sdxl", self._call_state)
            self._modules["unet"] = module
            self._patches_pending = False
        return self._modules["unet"]

    def with_weight_patches(self, patches: dict[str, Adapter], strength: float) -> tuple["DiffusionModel", set[str]]:
        """A copy of this MODEL with ``patches`` added at ``strength`` (ComfyUI clones the model
        patcher and adds them), and the keys that named one of its weights."""
        weights, taken = self.weights.add(patches, strength)
        if not taken:
            return self, taken
        view = copy.copy(self)
        view._modules = {**self._modules, "unet": weights.base}
        view.weights = weights
        view._patches_pending = True
        return view, taken

    def with_ip_adapter(self, patch) -> "DiffusionModel":
        """A copy of this MODEL whose cross-attentions also add ``patch``'s image tokens (after
        any IP-Adapter already applied), as ``ipadapter_execute`` patches a model clone."""
        from kiln.nodes.models.ip_attention import check_fits

        check_fits(self.weights.base, patch, self.arch == "sdxl")
        view = copy.copy(self)
        view._modules = {**self._modules, "unet": self.weights.base}
        view.ip_adapters = self.ip_adapters + (patch,)
        view._patches_pending = True
        return view

    def lora_keys(self) -> dict[str, str]:
        """LoRA tensor base name -> ComfyUI key of the weight it patches."""
        return unet_lora_keys(self.weights.targets, self.info.unet)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.base.dtype

    @property
    def device(self) -> torch.device:
        return self.weights.base.device

    def apply_model(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                    y: torch.Tensor | None = None, c_concat: torch.Tensor | None = None,
                    control: dict | None = None, cond_or_uncond: tuple[int, ...] = (1, 0)) -> torch.Tensor:
        """Denoised prediction as ComfyUI's ``BaseModel._apply_model`` (float32, x's shape).
        ``control``: ControlNet residuals, added to the input blocks' skips and the middle block's
        output in the UNet's dtype (``openaimodel.apply_control``). ``cond_or_uncond``: which CFG
        side each batch chunk is (0 positive, 1 negative), for the IP-Adapter attentions."""
        unet = self.unet
        if self._call_state is not None:
            self._call_state.sigma = sigma.reshape(-1)[0]
            self._call_state.cond_or_uncond = tuple(cond_or_uncond)
            self._call_state.latent_shape = tuple(x.shape)
        ms = self.model_sampling
        xc = ms.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat.to(xc.device, xc.dtype)], dim=1)
        xc = xc.to(self.device, self.dtype)
        t = nearest_timestep(sigma, self.log_sigmas).float().to(self.device)
        context = context.to(self.device, self.dtype)
        if y is not None:
            y = y.to(self.device, self.dtype)
        residuals = {}
        if control is not None:
            residuals = {"down_block_additional_residuals": tuple(r.to(self.dtype) for r in control["output"]),
                         "mid_block_additional_residual": control["middle"][0].to(self.dtype)}
        out = unet(xc, t, encoder_hidden_states=context, class_labels=y, return_dict=False, **residuals)[0]
        return ms.calculate_denoised(sigma, out.float().to(x.device), x)

    forward = apply_model

    def encode_adm(self, pooled_output: torch.Tensor | None, *, width: int, height: int, crop_w: int,
                   crop_h: int, target_width: int, target_height: int) -> torch.Tensor | None:
        """SDXL ``y``: pooled text, then embeddings of (height, width, crop_h, crop_w, target_height,
        target_width), as ``model_base.SDXL.encode_adm``; None for SD1/SD2."""
        if self.arch != "sdxl":
            return None
        if pooled_output is None:
            raise ValueError("SDXL conditioning needs a pooled_output")
        sizes = {"height": height, "width": width, "crop_h": crop_h, "crop_w": crop_w,
                 "target_height": target_height, "target_width": target_width}
        return sdxl_vector(pooled_output, sizes, self.info.adm_embed_dim)


def build_diffusion_model(sd: dict[str, torch.Tensor], info: ModelInfo, *, device="cpu",
                          dtype: torch.dtype = torch.float32) -> DiffusionModel:
    unet, ldm_names = build_unet(sd, info, device=device, dtype=dtype)
    return DiffusionModel(unet, info, ldm_names)
