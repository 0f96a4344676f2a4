"""ConvMixer-1024/20 (h=1024, d=20, k=9, p=14, GELU), 24,383,464 parameters,
on ImageNet-1k with the paper's recipe.

    python -m convmixer_jax.main --config configs/convmixer_1024_20.py --workdir DIR \
        --config.data_dir=TFDS_DATA_DIR

Recipe (the authors' timm settings): global batch 640, 150 epochs, AdamW (lr 0.01, betas
0.9/0.999, eps 1e-3, weight decay 2e-5 on >= 2-D parameters only), gradient clipping at global
norm 1.0, one-cycle schedule, label smoothing 0.1, random resized crop (bilinear or bicubic at
random) + flip, RandAugment rand-m9-mstd0.5-inc1, random erasing p 0.25, Mixup 0.5 / CutMix
0.5 (switch prob 0.5) drawn per 64 images and BatchNorm statistics per 64 images (the authors'
per-GPU batches; bn_group_size=0 gives sync-BN), bf16 compute.
Hardware: the authors' 10-GPU setup; one TPU v4-8 or an 8xH100 node.
Expected: 76.94% top-1 (the authors' result).
"""

from convmixer_jax.config import imagenet_config


def get_config():
    c = imagenet_config()
    c.model.name = "convmixer_1024_20_ks9_p14"
    # Keep only the pointwise-conv outputs for the backward pass: 64 images per device then fit
    # a 16 GiB TPU v3 core (3.98 GiB), a TPU v4 chip and an 80 GB H100 (README, "Memory").
    c.model.remat = "dots"
    c.num_epochs = 150.0
    return c
