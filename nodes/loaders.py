"""Model loader nodes: checkpoints, standalone VAEs and LoRAs, read from the files themselves."""
from __future__ import annotations

import weakref

from kiln.kernels.errors import InputError
from kiln.nodes.registry import COMBO, FLOAT, SOCKET, PlanSpec, RunContext, node


def load_once(ctx: RunContext, key: tuple, load):
    """Load each model file once per run (two loaders of one file share the modules) without
    keeping the models alive: one no node reads any more (a checkpoint's CLIP once the prompts
    are encoded) is freed, as the interpreter drops each output after its last reader."""
    held = ctx.cache.get(key)
    value = held() if held is not None else None
    if value is None:
        value = load()
        ctx.cache[key] = (lambda: value) if ctx.keep_models else _held_weakly(value)
    return value


def _held_weakly(value):
    """A callable giving ``value`` (a model or a tuple of them) back while all of it is alive, else
    None; a value that takes no weak reference (a LoRA's tensors) is held for the run."""
    single = not isinstance(value, tuple)
    try:
        refs = [None if item is None else weakref.ref(item) for item in ((value,) if single else value)]
    except TypeError:
        return lambda: value

    def get():   # holds the weak references only
        alive = tuple(None if ref is None else ref() for ref in refs)
        if any(ref is not None and item is None for ref, item in zip(refs, alive)):
            return None
        return alive[0] if single else alive
    return get


@node("CheckpointLoaderSimple", [COMBO("ckpt_name", (), folder="checkpoints")],
      ("MODEL", "CLIP", "VAE"), category="loaders", needs_context=True, display_name="Load Checkpoint")
def checkpoint_loader_simple(ctx: RunContext, ckpt_name: str):
    from kiln.nodes.models.checkpoint import load_checkpoint

    path = ctx.models.resolve("checkpoints", ckpt_name)
    return load_once(ctx, ("checkpoint", str(path), ctx.device, ctx.dtype),
                   lambda: tuple(load_checkpoint(path, device=ctx.device, dtype=ctx.torch_dtype)))


@node("VAELoader", [COMBO("vae_name", (), folder="vae")], ("VAE",), category="loaders",
      needs_context=True, display_name="Load VAE")
def vae_loader(ctx: RunContext, vae_name: str):
    from kiln.nodes.models.checkpoint import load_vae

    path = ctx.models.resolve("vae", vae_name)
    return (load_once(ctx, ("vae", str(path), ctx.device), lambda: load_vae(path, device=ctx.device)),)


def _strength(name: str) -> object:
    return FLOAT(name, 1.0, -100.0, 100.0, 0.01)


def _apply_lora(ctx: RunContext, model, clip, lora_name: str, strength_model: float, strength_clip: float):
    from kiln.nodes.models.checkpoint import ModelFileError, load_state_dict
    from kiln.kernels.lora import LoraFileError
    from kiln.nodes.models.lora import load_lora_for_models

    path = ctx.models.resolve("loras", lora_name)
    try:
        sd = load_once(ctx, ("lora", str(path)), lambda: load_state_dict(path))
        return load_lora_for_models(sd, model, clip, strength_model, strength_clip)
    except (LoraFileError, ModelFileError) as error:
        raise InputError("lora_name", f"{lora_name}: {getattr(error, 'message', error)}",
                         expected="a LoRA for this model", found=str(path)) from None


@node("LoraLoader", [SOCKET("model", "MODEL"), SOCKET("clip", "CLIP"), COMBO("lora_name", (), folder="loras"),
                     _strength("strength_model"), _strength("strength_clip")],
      ("MODEL", "CLIP"), category="loaders", needs_context=True, display_name="Load LoRA",
      plan=PlanSpec("lora", runtime_widgets={name: name for name in ("lora_name", "strength_model",
                                                                     "strength_clip")}))
def lora_loader(ctx: RunContext, model, clip, lora_name: str, strength_model: float, strength_clip: float):
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    return _apply_lora(ctx, model, clip, lora_name, strength_model, strength_clip)


@node("LoraLoaderModelOnly", [SOCKET("model", "MODEL"), COMBO("lora_name", (), folder="loras"),
                              _strength("strength_model")],
      ("MODEL",), category="loaders", needs_context=True, display_name="LoraLoaderModelOnly",
      plan=PlanSpec("lora", runtime_widgets={"lora_name": "lora_name", "strength_model": "strength_model"},
                    params={"strength_clip": 0.0}))
def lora_loader_model_only(ctx: RunContext, model, lora_name: str, strength_model: float):
    if strength_model == 0:
        return (model,)
    return (_apply_lora(ctx, model, None, lora_name, strength_model, 0.0)[0],)
