"""fusedit: fused kernels, training and benchmarks for Diffusion Transformers.

The top-level folders install under one import root, so nothing generic such as
`kernels` or `train` lands at the top of site-packages:

    cli/              -> fusedit            (package root and the CLI)
    kernels/          -> fusedit.kernels    (reference ops, triton/, pallas/)
    dit/              -> fusedit.dit        (model, diffusion, samplers, JAX twin)
    bench/            -> fusedit.bench      (benchmark harness)
    train/            -> fusedit.train      (training loop)
"""
from setuptools import setup

PACKAGES = {
    "fusedit": "cli",
    "fusedit.kernels": "kernels",
    "fusedit.kernels.triton": "kernels/triton",
    "fusedit.kernels.pallas": "kernels/pallas",
    "fusedit.dit": "dit",
    "fusedit.dit.jax": "dit/jax",
    "fusedit.bench": "bench",
    "fusedit.train": "train",
}

EXTRAS = {
    "test": ["pytest>=7", "pytest-benchmark", "hypothesis"],
    "jax": ["jax>=0.10", "flax>=0.12", "optax>=0.2.4"],
    "xformers": ["xformers"],
    "vae": ["diffusers", "transformers", "safetensors", "Pillow"],
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})

setup(
    name="fusedit",
    version="0.1.0",
    description="Fused Triton/Pallas kernels, training and benchmarks for Diffusion Transformers (DiT)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"fusedit.bench": ["schema.json"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton; platform_system == 'Linux'",
        "fvcore",
        "rich",
        "tqdm",
        "psutil",
        "matplotlib",
        "scikit-learn",
        "safetensors",
        "Pillow",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fusedit = fusedit.cli:entry"]},
)
