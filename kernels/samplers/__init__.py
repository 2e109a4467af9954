"""ComfyUI's sampler names -> sampling functions, one loop per sampler.

Every sampler has k-diffusion's signature
``sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x``
where ``model`` is a :class:`kiln.kernels.cfg.Denoiser` with ``model.model_sampling``
(a :class:`kiln.kernels.model_sampling.ModelSamplingDiscrete`). ``extra_args`` carries ``seed``
(noise samplers are seeded from it as ComfyUI seeds them), ``denoise_mask`` and ``step_mode``
(``kiln.kernels.fused.dispatch``: which implementation runs the step kernels). A sampler is found
by its function name, ``sample_<name>``, in the family modules below; ``ALIASES`` holds the
ComfyUI names that are another sampler with options.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

# ComfyUI v0.3.64 comfy/samplers.py: KSAMPLER_NAMES, in its order (the KSampler widget list).
KSAMPLER_NAMES = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis",
    "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp",
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
)
SAMPLER_NAMES = KSAMPLER_NAMES + ("ddim", "uni_pc", "uni_pc_bh2")
# KSampler computes steps+1 sigmas and drops the penultimate one for these.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})

# The modules holding the ``sample_<name>`` functions, searched in this order.
FAMILY_MODULES = ("classic", "dpmpp", "cfg_pp", "res_multistep", "multistep", "er_sde", "uni_pc", "dpm_solver",
                  "seeds", "sa_solver")

# ComfyUI name -> (sampler it runs, options). ComfyUI builds ddim as euler (its random inpaint
# noise is kiln.kernels.ksampler's business); the _gpu names only move the Brownian tree.
ALIASES: dict[str, tuple[str, dict]] = {
    "ddim": ("euler", {}),
    "euler_cfg_pp": ("euler_ancestral_cfg_pp", {"eta": 0.0, "s_noise": 0.0}),
    "dpmpp_sde_gpu": ("dpmpp_sde", {"cpu_tree": False}),
    "dpmpp_2m_sde_gpu": ("dpmpp_2m_sde", {"cpu_tree": False}),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_2m_sde_heun_gpu": ("dpmpp_2m_sde", {"solver_type": "heun", "cpu_tree": False}),
    "dpmpp_3m_sde_gpu": ("dpmpp_3m_sde", {"cpu_tree": False}),
    "res_multistep_cfg_pp": ("res_multistep", {"cfg_pp": True}),
    "res_multistep_ancestral": ("res_multistep", {"eta": 1.0}),
    "res_multistep_ancestral_cfg_pp": ("res_multistep", {"eta": 1.0, "cfg_pp": True}),
    "gradient_estimation_cfg_pp": ("gradient_estimation", {"cfg_pp": True}),
    "sa_solver_pece": ("sa_solver", {"use_pece": True}),
    "uni_pc_bh2": ("uni_pc", {"variant": "bh2"}),
}


@functools.cache
def get_sampler(name: str) -> Callable:
    """The sampling function for a ComfyUI sampler name (KeyError if unknown)."""
    if name not in SAMPLER_NAMES:
        raise KeyError(name)
    target, options = ALIASES.get(name, (name, {}))
    for module_name in FAMILY_MODULES:
        function = getattr(importlib.import_module(f"{__name__}.{module_name}"), f"sample_{target}", None)
        if function is not None:
            return functools.partial(function, **options) if options else function
    raise KeyError(name)
