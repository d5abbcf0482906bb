"""fusedit: fused kernels, training and benchmarks for Diffusion Transformers."""
__version__ = "0.1.0"
