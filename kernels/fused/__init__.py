"""Fused sampler-step kernels (Triton) with plain-torch twins.

* ``dispatch.step(family, coef, scale, mode=...)``: one step; the Triton kernel on CUDA, the twin
  elsewhere, or both side by side (``check``).
* ``families``: each kernel's inputs, outputs and switches; the twins' calls (no Triton needed).
* ``ops``: the Triton launcher and the ``kiln::fused_*`` torch.library ops (import before
  loading a plan that uses them).

The sampler loops driving them live in ``kiln.kernels.samplers``.
"""
