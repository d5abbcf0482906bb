"""fusedit.train: training (`fusedit train`, DDP through torchrun), data sources, checkpoints,
sampling (`fusedit sample`), offline evaluation (`fusedit eval digits`) and VAE latent
extraction (`fusedit extract`).

    torchrun --nproc_per_node=N -m fusedit.train [flags of `fusedit train`]
"""
