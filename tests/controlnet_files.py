"""ControlNet files for the tests, built from a checkpoint's own UNet: the input half copied,
identity zero-convs and a hint block that adds nothing, so its residuals must equal the UNet's
own skip activations (a reference that needs no ControlNet code). Written in the original
layout (``control_model.*``) and, through diffusers' converter, in diffusers' layout."""
from __future__ import annotations

import torch
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

UNET = "model.diffusion_model."
HINT_WIDTHS = (16, 32, 96, 256)


def _block_widths(sd: dict[str, torch.Tensor]) -> list[int]:
    """Output channels of each UNet input block, in order."""
    widths, i = [], 0
    while any(k.startswith(f"{UNET}input_blocks.{i}.") for k in sd):
        p = f"{UNET}input_blocks.{i}.0."
        candidates = (p + "out_layers.3.weight", p + "op.weight", f"{UNET}input_blocks.{i}.0.weight")
        key = next(k for k in candidates if k in sd)
        widths.append(sd[key].shape[0])
        i += 1
    return widths


def controlnet_state_dict(sd: dict[str, torch.Tensor], *, identity: bool = True, hint_channels: int = 3,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Original layout. ``identity``: zero-convs and middle_block_out are 1x1 identities and the
    hint block is zero; else all of them random."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if k.startswith(UNET) and k[len(UNET):].split(".")[0] in ("input_blocks", "middle_block", "time_embed",
                                                                   "label_emb"):
            out["control_model." + k[len(UNET):]] = v.float().clone()

    def conv(n_out: int, n_in: int, k: int, eye: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if eye:
            w = torch.zeros(n_out, n_in, k, k)
            w[:, :, k // 2, k // 2] = torch.eye(n_out, n_in)
            return w, torch.zeros(n_out)
        return torch.randn(n_out, n_in, k, k, generator=g) * 0.05, torch.randn(n_out, generator=g) * 0.01

    widths = _block_widths(sd)
    for i, c in enumerate(widths):
        name = f"control_model.zero_convs.{i}.0."
        out[name + "weight"], out[name + "bias"] = conv(c, c, 1, identity)
    mid = sd[f"{UNET}middle_block.2.out_layers.3.weight"].shape[0]
    name = "control_model.middle_block_out.0."
    out[name + "weight"], out[name + "bias"] = conv(mid, mid, 1, identity)
    chain = [hint_channels, HINT_WIDTHS[0], HINT_WIDTHS[0], HINT_WIDTHS[1], HINT_WIDTHS[1], HINT_WIDTHS[2],
             HINT_WIDTHS[2], HINT_WIDTHS[3], widths[0]]
    for j in range(8):
        w, b = conv(chain[j + 1], chain[j], 3, False)
        if identity:
            w, b = torch.zeros_like(w), torch.zeros_like(b)
        out[f"control_model.input_hint_block.{2 * j}.weight"] = w
        out[f"control_model.input_hint_block.{2 * j}.bias"] = b
    return out


def diffusers_layout(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same ControlNet under diffusers' names (diffusers' own converter; SDXL's label_emb as
    the ``add_embedding`` diffusers' SDXL ControlNets carry)."""
    sd = convert_controlnet_checkpoint(original, {"layers_per_block": _layers_per_block(original)})
    for ldm, name in (("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")):
        for s in ("weight", "bias"):
            if f"control_model.{ldm}.{s}" in original:
                sd[f"{name}.{s}"] = original[f"control_model.{ldm}.{s}"]
    return {k: v for k, v in sd.items() if v is not None}


def _layers_per_block(original: dict[str, torch.Tensor]) -> int:
    """Res blocks per level: input blocks between downsamplers."""
    i, count = 1, 0
    while f"control_model.input_blocks.{i}.0.in_layers.0.weight" in original:
        count += 1
        i += 1
    return count
