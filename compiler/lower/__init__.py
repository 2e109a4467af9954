"""Lowering: stage modules (denoiser, fused chains), torch.export + AOTInductor, the plan file."""
