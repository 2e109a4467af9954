"""Sampler registry: ComfyUI's sampler names -> k-diffusion-shaped sampling functions.

Every sampler has the signature
``sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x``
where ``model(x, sigma_batch, **extra_args)`` returns the denoised prediction and exposes
``model.model_sampling`` (a :class:`kiln.kernels.model_sampling.ModelSamplingDiscrete`).
``extra_args`` carries ``seed`` (noise samplers are seeded from it as ComfyUI seeds them) and
``model_options`` (where ``*_cfg_pp`` samplers add a ``sampler_post_cfg_function`` hook).
Each sampler's per-step arithmetic is a separate ``*_step`` function (the future fused kernel's twin).
"""
from __future__ import annotations

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

# name -> "module:function" inside kiln.kernels.samplers; imported on first use.
_TABLE: dict[str, str] = {
    # classic (k-diffusion) family
    "euler": "classic:sample_euler",
    "euler_ancestral": "classic:sample_euler_ancestral",
    "heun": "classic:sample_heun",
    "heunpp2": "classic:sample_heunpp2",
    "dpm_2": "classic:sample_dpm_2",
    "dpm_2_ancestral": "classic:sample_dpm_2_ancestral",
    "lms": "classic:sample_lms",
    "dpm_fast": "dpm_solver:sample_dpm_fast",
    "dpm_adaptive": "dpm_solver:sample_dpm_adaptive",
    "dpmpp_2s_ancestral": "dpmpp:sample_dpmpp_2s_ancestral",
    "dpmpp_sde": "dpmpp:sample_dpmpp_sde",
    "dpmpp_sde_gpu": "dpmpp:sample_dpmpp_sde_gpu",
    "dpmpp_2m": "dpmpp:sample_dpmpp_2m",
    "dpmpp_2m_sde": "dpmpp:sample_dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu": "dpmpp:sample_dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun": "dpmpp:sample_dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu": "dpmpp:sample_dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde": "dpmpp:sample_dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu": "dpmpp:sample_dpmpp_3m_sde_gpu",
    "ddpm": "classic:sample_ddpm",
    "lcm": "classic:sample_lcm",
    # cfg++ variants
    "euler_cfg_pp": "cfg_pp:sample_euler_cfg_pp",
    "euler_ancestral_cfg_pp": "cfg_pp:sample_euler_ancestral_cfg_pp",
    "dpmpp_2s_ancestral_cfg_pp": "cfg_pp:sample_dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_2m_cfg_pp": "cfg_pp:sample_dpmpp_2m_cfg_pp",
    # multistep / newer solvers
    "ipndm": "multistep:sample_ipndm",
    "ipndm_v": "multistep:sample_ipndm_v",
    "deis": "multistep:sample_deis",
    "res_multistep": "res_multistep:sample_res_multistep",
    "res_multistep_cfg_pp": "res_multistep:sample_res_multistep_cfg_pp",
    "res_multistep_ancestral": "res_multistep:sample_res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp": "res_multistep:sample_res_multistep_ancestral_cfg_pp",
    "gradient_estimation": "multistep:sample_gradient_estimation",
    "gradient_estimation_cfg_pp": "multistep:sample_gradient_estimation_cfg_pp",
    "er_sde": "er_sde:sample_er_sde",
    "seeds_2": "seeds:sample_seeds_2",
    "seeds_3": "seeds:sample_seeds_3",
    "sa_solver": "sa_solver:sample_sa_solver",
    "sa_solver_pece": "sa_solver:sample_sa_solver_pece",
    "ddim": "classic:sample_euler",   # ComfyUI: ddim = euler (+ random inpaint noise, see ksampler)
    "uni_pc": "uni_pc:sample_unipc",
    "uni_pc_bh2": "uni_pc:sample_unipc_bh2",
}


def get_sampler(name: str) -> Callable:
    """The sampling function for a ComfyUI sampler name (KeyError if unknown)."""
    module_name, func_name = _TABLE[name].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, func_name)
