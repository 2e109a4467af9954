"""Which model weight each LoRA tensor name patches: ComfyUI's key maps for SD1.x, SD2.x and SDXL
(``comfy/lora.py``: ``model_lora_keys_unet``, ``model_lora_keys_clip``; ``comfy/utils.py``:
``unet_to_diffusers``), built in ComfyUI's insertion order so that, as there, a later alias of
one name wins.

Targets are ComfyUI's own state-dict keys: ``diffusion_model.<ldm path>.weight`` for the UNet,
``clip_<l|h|g>.transformer.<transformers path>.weight`` for the text encoders; each model handle
maps those keys to its own parameters.
"""
from __future__ import annotations

from typing import Iterable

from kiln.nodes.models.detect import UnetConfig

UNET_KEY_PREFIX = "diffusion_model."

_CLIP_LAYER_KINDS = {
    "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}

_ATTENTION = ("proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm.weight", "norm.bias")
_TRANSFORMER_BLOCK = (
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
)
_RESNET = {
    "in_layers.2.weight": "conv1.weight", "in_layers.2.bias": "conv1.bias",
    "emb_layers.1.weight": "time_emb_proj.weight", "emb_layers.1.bias": "time_emb_proj.bias",
    "out_layers.3.weight": "conv2.weight", "out_layers.3.bias": "conv2.bias",
    "skip_connection.weight": "conv_shortcut.weight", "skip_connection.bias": "conv_shortcut.bias",
    "in_layers.0.weight": "norm1.weight", "in_layers.0.bias": "norm1.bias",
    "out_layers.0.weight": "norm2.weight", "out_layers.0.bias": "norm2.bias",
}
_BASIC = (
    ("label_emb.0.0.weight", "class_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "class_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "class_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "class_embedding.linear_2.bias"),
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias"),
    ("time_embed.0.weight", "time_embedding.linear_1.weight"), ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"), ("time_embed.2.bias", "time_embedding.linear_2.bias"),
)


def _attention_names(names: dict[str, str], diffusers: str, ldm: str, transformers: int) -> None:
    """A SpatialTransformer's names: its projections and norm, then each transformer block's."""
    for b in _ATTENTION:
        names[f"{diffusers}.{b}"] = f"{ldm}.{b}"
    for t in range(transformers):
        for b in _TRANSFORMER_BLOCK:
            names[f"{diffusers}.transformer_blocks.{t}.{b}"] = f"{ldm}.transformer_blocks.{t}.{b}"


def unet_to_diffusers(config: UnetConfig) -> dict[str, str]:
    """diffusers UNet name -> LDM name, as ComfyUI's ``unet_to_diffusers`` lists them."""
    names: dict[str, str] = {}
    depth = list(config.transformer_depth)
    depth_output = list(config.transformer_depth_output)
    res_blocks = list(config.num_res_blocks)
    levels = len(config.channel_mult)
    for x in range(levels):
        n = 1 + (res_blocks[x] + 1) * x
        for i in range(res_blocks[x]):
            for ldm, diffusers in _RESNET.items():
                names[f"down_blocks.{x}.resnets.{i}.{diffusers}"] = f"input_blocks.{n}.0.{ldm}"
            transformers = depth.pop(0)
            if transformers > 0:
                _attention_names(names, f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", transformers)
            n += 1
        for k in ("weight", "bias"):
            names[f"down_blocks.{x}.downsamplers.0.conv.{k}"] = f"input_blocks.{n}.0.op.{k}"
    _attention_names(names, "mid_block.attentions.0", "middle_block.1", max(config.transformer_depth_middle, 0))
    for i, n in enumerate((0, 2)):
        for ldm, diffusers in _RESNET.items():
            names[f"mid_block.resnets.{i}.{diffusers}"] = f"middle_block.{n}.{ldm}"
    res_blocks.reverse()
    for x in range(levels):
        n = (res_blocks[x] + 1) * x
        count = res_blocks[x] + 1
        for i in range(count):
            c = 1
            for ldm, diffusers in _RESNET.items():
                names[f"up_blocks.{x}.resnets.{i}.{diffusers}"] = f"output_blocks.{n}.0.{ldm}"
            transformers = depth_output.pop()
            if transformers > 0:
                c += 1
                _attention_names(names, f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", transformers)
            if i == count - 1:
                for k in ("weight", "bias"):
                    names[f"up_blocks.{x}.upsamplers.0.conv.{k}"] = f"output_blocks.{n}.{c}.conv.{k}"
            n += 1
    for ldm, diffusers in _BASIC:
        names[diffusers] = ldm
    return names


def unet_lora_keys(model_keys: Iterable[str], config: UnetConfig) -> dict[str, str]:
    """LoRA base name -> ``diffusion_model.*`` key (``model_lora_keys_unet`` for LDM UNets)."""
    key_map: dict[str, str] = {}
    for k in model_keys:
        if not k.startswith(UNET_KEY_PREFIX):
            continue
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[len(UNET_KEY_PREFIX):-len(".weight")].replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k      # the generic format: the key itself
        else:
            key_map[k] = k
    for diffusers, ldm in unet_to_diffusers(config).items():
        if not diffusers.endswith(".weight"):
            continue
        target = UNET_KEY_PREFIX + ldm
        base = diffusers[:-len(".weight")]
        key_map["lora_unet_" + base.replace(".", "_")] = target
        key_map["lycoris_" + base.replace(".", "_")] = target
        for prefix in ("", "unet."):
            name = prefix + base.replace(".to_", ".processor.to_")
            if name.endswith(".to_out.0"):
                name = name[:-2]
            key_map[name] = target
    return key_map


def clip_lora_keys(model_keys: Iterable[str]) -> dict[str, str]:
    """LoRA base name -> ``clip_*.transformer.*`` key (``model_lora_keys_clip`` for the CLIP-L,
    OpenCLIP-H and CLIP-L + bigG text encoders of SD1, SD2 and SDXL)."""
    keys = list(model_keys)
    present = set(keys)
    key_map = {f"text_encoders.{k[:-len('.weight')]}": k for k in keys if k.endswith(".weight")}
    clip_l_present = False
    layer = "text_model.encoder.layers.{}.{}.weight"
    for b in range(32):
        for kind, kohya in _CLIP_LAYER_KINDS.items():
            k = "clip_h.transformer." + layer.format(b, kind)
            if k in present:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{kohya}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{kohya}"] = k
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{kind}"] = k
            k = "clip_l.transformer." + layer.format(b, kind)
            if k in present:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{kohya}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{kohya}"] = k
                clip_l_present = True
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{kind}"] = k
            k = "clip_g.transformer." + layer.format(b, kind)
            if k in present:
                if clip_l_present:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{kohya}"] = k
                    key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{kind}"] = k
                else:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{kohya}"] = k
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{kind}"] = k
                    key_map[f"lora_prior_te_text_model_encoder_layers_{b}_{kohya}"] = k
    if "clip_g.transformer.text_projection.weight" in present:
        key_map["lora_prior_te_text_projection"] = "clip_g.transformer.text_projection.weight"
        key_map["lora_te2_text_projection"] = "clip_g.transformer.text_projection.weight"
    if "clip_l.transformer.text_projection.weight" in present:
        key_map["lora_te1_text_projection"] = "clip_l.transformer.text_projection.weight"
    return key_map
