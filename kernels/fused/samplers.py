"""Registry of the fused sampler loops: ComfyUI sampler name -> loop over a split denoiser.

A fused loop takes the same arguments as its eager twin in ``kiln.kernels.samplers`` but a model
that returns cond and uncond separately (``loop.SplitDenoiser``). Samplers not listed here
(heunpp2, dpm_fast, dpm_adaptive, gradient_estimation(_cfg_pp), seeds_2/3, sa_solver(_pece))
have no fused loop: run the eager sampler for them, and for runs whose model_options carry CFG
hooks (``loop.fusable_options``).
"""
from __future__ import annotations

import importlib
from typing import Callable

_TABLE: dict[str, str] = {
    "euler": "classic:sample_euler",
    "ddim": "classic:sample_euler",
    "euler_ancestral": "classic:sample_euler_ancestral",
    "heun": "classic:sample_heun",
    "dpm_2": "classic:sample_dpm_2",
    "dpm_2_ancestral": "classic:sample_dpm_2_ancestral",
    "lms": "classic:sample_lms",
    "ddpm": "classic:sample_ddpm",
    "lcm": "classic:sample_lcm",
    "dpmpp_2s_ancestral": "dpmpp:sample_dpmpp_2s_ancestral",
    "dpmpp_2m": "dpmpp:sample_dpmpp_2m",
    "dpmpp_sde": "dpmpp:sample_dpmpp_sde",
    "dpmpp_sde_gpu": "dpmpp:sample_dpmpp_sde_gpu",
    "dpmpp_2m_sde": "dpmpp:sample_dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu": "dpmpp:sample_dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun": "dpmpp:sample_dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu": "dpmpp:sample_dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde": "dpmpp:sample_dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu": "dpmpp:sample_dpmpp_3m_sde_gpu",
    "euler_cfg_pp": "cfg_pp:sample_euler_cfg_pp",
    "euler_ancestral_cfg_pp": "cfg_pp:sample_euler_ancestral_cfg_pp",
    "dpmpp_2s_ancestral_cfg_pp": "cfg_pp:sample_dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_2m_cfg_pp": "cfg_pp:sample_dpmpp_2m_cfg_pp",
    "res_multistep": "cfg_pp:sample_res_multistep",
    "res_multistep_cfg_pp": "cfg_pp:sample_res_multistep_cfg_pp",
    "res_multistep_ancestral": "cfg_pp:sample_res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp": "cfg_pp:sample_res_multistep_ancestral_cfg_pp",
    "ipndm": "multistep:sample_ipndm",
    "ipndm_v": "multistep:sample_ipndm_v",
    "deis": "multistep:sample_deis",
    "er_sde": "multistep:sample_er_sde",
    "uni_pc": "uni_pc:sample_unipc",
    "uni_pc_bh2": "uni_pc:sample_unipc_bh2",
}
FUSED_SAMPLER_NAMES = frozenset(_TABLE)


def get_fused_sampler(name: str) -> Callable | None:
    """The fused loop for a ComfyUI sampler name, or None when only the eager sampler exists."""
    if name not in _TABLE:
        return None
    module_name, func_name = _TABLE[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module_name}"), func_name)
