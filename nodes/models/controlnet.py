"""ControlNets for SD1.x, SD2.x and SDXL, read from the file itself (``comfy/controlnet.py:
load_controlnet_state_dict``) and run as ComfyUI's ``ControlNet.get_control`` runs them.

Files come in the original layout (``control_model.`` + ``input_blocks``, ``zero_convs``,
``input_hint_block``, ``middle_block_out``; also without the prefix) or in diffusers' layout
(``controlnet_cond_embedding``, ``controlnet_down_blocks``). The module is diffusers'
``ControlNetModel``; original names reach it through ComfyUI's own diffusers <-> LDM table
(``lora_keys.unet_to_diffusers``), and SDXL's ``label_emb`` / diffusers' ``add_embedding`` is the
``projection`` class embedding that takes ``y`` as the UNet's does.
"""
from __future__ import annotations

import os
import re
from dataclasses import InitVar, dataclass, field, replace

import torch
from diffusers import ControlNetModel

from kiln.kernels.batching import broadcast_image_to
from kiln.kernels.model_sampling import nearest_timestep
from kiln.nodes.models.detect import ModelFileError, check_conversion, count_blocks, describe_keys, detect_unet_config
from kiln.nodes.models.lora_keys import unet_to_diffusers
from kiln.nodes.models.patching import Tensors
from kiln.nodes.resize import common_upscale

_ORIGINAL_MARKER = "zero_convs.0.0.weight"
_DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"
_UNSUPPORTED = {
    "lora_controlnet": "a Control-LoRA", "difference": "a difference ControlNet (DiffControlNetLoader)",
    "after_proj_list.18.bias": "a HunyuanDiT ControlNet", "controlnet_blocks.0.weight": "an SD3/Flux ControlNet",
    "controlnet_blocks.0.linear.weight": "a Flux ControlNet",
    "control_add_embedding.linear_1.bias": "a union ControlNet",
}


def _original_to_diffusers(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Original-layout names -> diffusers' (the inverse of ComfyUI's table, plus the ControlNet's own parts)."""
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    config = detect_unet_config({"u." + k: v for k, v in sd.items()}, "u.")
    if config is None:
        raise ModelFileError(f"expected a ControlNet's input_blocks, found {describe_keys(sd)}")
    # No output blocks: the table's output half (depths 0) names nothing here.
    outputs = (0,) * sum(n + 1 for n in config.num_res_blocks)
    table = unet_to_diffusers(replace(config, transformer_depth_output=outputs))
    names = {ldm: diffusers for diffusers, ldm in table.items() if not diffusers.startswith("add_embedding.")}
    for i in range(count_blocks(sd, "zero_convs.{}.")):
        for s in ("weight", "bias"):
            names[f"zero_convs.{i}.0.{s}"] = f"controlnet_down_blocks.{i}.{s}"
    hint = sorted(int(m[1]) for k in sd if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    for j, index in enumerate(hint):
        target = "conv_in" if j == 0 else "conv_out" if j == len(hint) - 1 else f"blocks.{j - 1}"
        for s in ("weight", "bias"):
            names[f"input_hint_block.{index}.{s}"] = f"controlnet_cond_embedding.{target}.{s}"
    for s in ("weight", "bias"):
        names[f"middle_block_out.0.{s}"] = f"controlnet_mid_block.{s}"
    unknown = [k for k in sd if k not in names]
    if unknown:
        raise ModelFileError(f"ControlNet tensors kiln cannot place: {', '.join(unknown[:5])}")
    return {names[k]: v for k, v in sd.items()}


def _count(keys, template: str) -> int:
    return count_blocks(keys, template)


def controlnet_config(sd: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """(family, ``ControlNetModel`` config) read from diffusers-layout tensors."""
    keys = set(sd)
    model_channels, in_channels = sd["conv_in.weight"].shape[:2]
    levels = _count(keys, "down_blocks.{}.")
    layers = _count(keys, "down_blocks.0.resnets.{}.")
    widths = [sd[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
    depths = [_count(keys, f"down_blocks.{i}.attentions.0.transformer_blocks.{{}}.") for i in range(levels)]
    middle = _count(keys, "mid_block.attentions.0.transformer_blocks.{}.")
    context = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj = next((v for k, v in sd.items() if k.endswith("proj_in.weight")), None)
    if context is None or proj is None or middle < 1:
        raise ModelFileError("expected a ControlNet with cross-attention transformers (also in its middle block)")
    linear = proj.ndim == 2
    adm = sd["class_embedding.linear_1.weight"].shape[1] if "class_embedding.linear_1.weight" in sd else None
    family = "sdxl" if adm is not None else "sd2" if linear else "sd1"
    heads = [8 if family == "sd1" else w // 64 for w in widths]   # ComfyUI: SD1 8 heads, else 64-wide heads
    if depths[-1] == 0:
        depths[-1] = middle   # diffusers takes the middle depth from the last level's entry
    hint_blocks = _count(keys, "controlnet_cond_embedding.blocks.{}.")
    embedding = [sd["controlnet_cond_embedding.conv_in.weight"].shape[0]] + \
        [sd[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0] for i in range(1, hint_blocks, 2)]
    return family, {
        "in_channels": int(in_channels), "conditioning_channels": int(sd[_DIFFUSERS_MARKER].shape[1]),
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in
                             [_count(keys, f"down_blocks.{i}.attentions.{{}}.") for i in range(levels)]],
        "block_out_channels": [int(w) for w in widths], "layers_per_block": layers,
        "cross_attention_dim": int(context), "attention_head_dim": heads, "use_linear_projection": linear,
        "transformer_layers_per_block": depths, "class_embed_type": "projection" if adm is not None else None,
        "projection_class_embeddings_input_dim": None if adm is None else int(adm),
        "conditioning_embedding_out_channels": [int(c) for c in embedding], "upcast_attention": family == "sd2",
    }


@dataclass(eq=False)
class ControlNet:
    """CONTROL_NET: the loaded model (``module``) and the file's global-average-pooling flag."""

    module: ControlNetModel
    family: str
    global_average_pooling: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    def residuals(self, x: torch.Tensor, sigma: torch.Tensor, hint: torch.Tensor, context: torch.Tensor,
                  y: torch.Tensor | None, model) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The zero-conv outputs (one per UNet input block) and the middle block's, for the
        batched sampler input ``x`` at ``sigma`` (ComfyUI feeds ``calculate_input(sigma, x)``)."""
        dtype = self.dtype
        ms = model.model_sampling
        t = nearest_timestep(sigma, model.log_sigmas).float()
        xc = ms.calculate_input(sigma, x).to(dtype)
        down, mid = self.module(xc, t.to(dtype), encoder_hidden_states=context.to(x.device, dtype),
                                controlnet_cond=hint, conditioning_scale=1.0,
                                class_labels=None if y is None else y.to(x.device, dtype), return_dict=False)
        return list(down), mid


def load_controlnet(sd: dict[str, torch.Tensor], path: str | os.PathLike, *, device="cpu",
                    dtype: torch.dtype = torch.float32) -> ControlNet:
    """The ControlNet in ``sd`` (the file at ``path``: a name ending ``_shuffle`` pools globally, as in ComfyUI)."""
    for marker, what in _UNSUPPORTED.items():
        if marker in sd:
            raise ModelFileError(f"found {what}, which kiln does not support")
    if _DIFFUSERS_MARKER in sd:
        named = {("class_embedding." + k[len("add_embedding."):] if k.startswith("add_embedding.") else k): v
                 for k, v in sd.items()}
    elif "control_model." + _ORIGINAL_MARKER in sd:
        named = _original_to_diffusers(sd, "control_model.")
    elif _ORIGINAL_MARKER in sd:
        named = _original_to_diffusers(sd, "")
    else:
        raise ModelFileError(f"expected a ControlNet (control_model.zero_convs.* or controlnet_cond_embedding.*), "
                             f"found {describe_keys(sd)}")
    family, config = controlnet_config(named)
    with torch.device("meta"):
        module = ControlNetModel(**config)
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_conversion(named, named, expected, "ControlNet")
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in named.items()}, strict=True, assign=True)
    stem = os.path.splitext(os.fspath(path))[0]
    return ControlNet(module.eval().requires_grad_(False), family,
                      global_average_pooling=stem.endswith(("_shuffle", "_shuffle_fp16")))


@dataclass(eq=False)
class Control:
    """A ControlNet applied to conditioning entries (ComfyUI's ``ControlNet.copy()`` with its
    hint): compared by identity, since entries batch together only when they share one."""

    net: ControlNet
    hint: InitVar[torch.Tensor]              # IMAGE as NCHW in [0, 1]
    strength: float
    percent_range: tuple[float, float]
    previous: "Control | None" = None
    _hints: dict = field(default_factory=dict, repr=False)
    source: Tensors = field(init=False)      # the hint, as a buffer

    def __post_init__(self, hint: torch.Tensor):
        self.source = Tensors(hint=hint)

    def get_control(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                    batched_number: int, model) -> dict | None:
        """``{"output": [...], "middle": [...]}`` residuals for one batched model call, merged
        with the chained previous ControlNet's; None outside every ControlNet's window."""
        previous = None if self.previous is None else self.previous.get_control(x, sigma, context, y,
                                                                                  batched_number, model)
        inside = None
        if self.windowed:   # the full range (0, 1) holds every sigma: no test needed
            start, end = (model.model_sampling.percent_to_sigma(p) for p in self.percent_range)
            if torch.compiler.is_exporting():   # a plan's denoiser: a select on sigma, not a branch
                inside = (sigma[0] <= start) & (sigma[0] >= end)
            elif sigma[0] > start or sigma[0] < end:
                return previous
        down, mid = self.net.residuals(x, sigma, self._hint(x, batched_number), context, y, model)
        out = {"output": self._scaled(down), "middle": self._scaled([mid])}
        if inside is not None:   # outside the window the residuals are zeros: the skips stay as they are
            out = {key: [torch.where(inside, t, torch.zeros_like(t)) for t in values] for key, values in out.items()}
        if previous is not None:
            for key in ("output", "middle"):
                mine = out[key]
                for i, value in enumerate(previous[key]):
                    if i >= len(mine):
                        mine.append(value)
                    elif value is not None:
                        mine[i] = value if mine[i] is None else value + mine[i]
        return out

    @property
    def windowed(self) -> bool:
        return tuple(self.percent_range) != (0.0, 1.0)

    def _hint(self, x: torch.Tensor, batched_number: int) -> torch.Tensor:
        """The hint at 8x the latent size (nearest-exact after a center crop), in the ControlNet's
        dtype, broadcast to the batch (``broadcast_image_to``); kept per size, except while a
        plan's denoiser is being exported (its tensors are the trace's)."""
        size = (x.shape[-2] * 8, x.shape[-1] * 8)
        hint = self._hints.get(size)
        if hint is None:
            hint = common_upscale(self.source.hint, size[1], size[0], "nearest-exact", "center")
            hint = hint.to(device=x.device, dtype=self.net.dtype)
            if not torch.compiler.is_exporting():
                self._hints[size] = hint
        return hint if hint.shape[0] == x.shape[0] else broadcast_image_to(hint, x.shape[0], batched_number)

    def _scaled(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for t in tensors:
            if self.net.global_average_pooling:
                t = torch.mean(t, dim=(2, 3), keepdim=True).repeat(1, 1, t.shape[2], t.shape[3])
            out.append(t * self.strength)
        return out
