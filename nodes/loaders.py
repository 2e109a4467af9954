"""Model loader nodes: checkpoints and standalone VAEs, read from the files themselves."""
from __future__ import annotations

from kiln.nodes.registry import COMBO, RunContext, node


def _cached(ctx: RunContext, key: tuple, load):
    """Load each model file once per run (two loaders of one file share the modules)."""
    if key not in ctx.cache:
        ctx.cache[key] = load()
    return ctx.cache[key]


@node("CheckpointLoaderSimple", [COMBO("ckpt_name", (), folder="checkpoints")],
      ("MODEL", "CLIP", "VAE"), category="loaders", needs_context=True, display_name="Load Checkpoint")
def checkpoint_loader_simple(ctx: RunContext, ckpt_name: str):
    from kiln.nodes.models.checkpoint import load_checkpoint

    path = ctx.models.resolve("checkpoints", ckpt_name)
    return _cached(ctx, ("checkpoint", str(path), ctx.device, ctx.dtype),
                   lambda: tuple(load_checkpoint(path, device=ctx.device, dtype=ctx.torch_dtype)))


@node("VAELoader", [COMBO("vae_name", (), folder="vae")], ("VAE",), category="loaders",
      needs_context=True, display_name="Load VAE")
def vae_loader(ctx: RunContext, vae_name: str):
    from kiln.nodes.models.checkpoint import load_vae

    path = ctx.models.resolve("vae", vae_name)
    return (_cached(ctx, ("vae", str(path), ctx.device), lambda: load_vae(path, device=ctx.device)),)
