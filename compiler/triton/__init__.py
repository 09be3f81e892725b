"""Triton kernels for CUDA and ROCm: one module per dflash op, registered as providers."""
