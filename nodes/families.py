"""Imports every node family module; each registers its nodes with the registry on import."""
from kiln.nodes import (  # noqa: F401
    conditioning,
    image,
    latent,
    loaders,
    sampling,
    text,
    upscale,
    vae,
)
