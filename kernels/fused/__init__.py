"""Fused sampler-step kernels (Triton) with plain-torch twins, and sampler loops that use them.

* ``dispatch.step(family, coef, scale, ...)``: one step, Triton on CUDA, the twin elsewhere;
  ``dispatch.set_mode`` / env ``KILN_FUSED`` switch the kernels off for A/B checks.
* ``samplers.get_fused_sampler(name)``: the fused loop of a ComfyUI sampler, driving a
  ``loop.SplitDenoiser`` (cond and uncond predictions; the CFG combine happens in the kernel).
* ``ops``: the ``kiln::fused_*`` torch.library ops (import before loading a plan that uses them).
"""
