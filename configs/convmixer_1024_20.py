"""ConvMixer-1024/20 (h=1024, d=20, k=9, p=14, GELU), 24,383,464 parameters,
on ImageNet-1k with the paper's recipe.

    python -m convmixer_jax.main --config configs/convmixer_1024_20.py:v4-8 --workdir DIR \
        --config.data_dir=TFDS_DATA_DIR

Recipe (the authors' timm settings): global batch 640, 150 epochs, AdamW (lr 0.01, betas
0.9/0.999, eps 1e-3, weight decay 2e-5 on >= 2-D parameters only), gradient clipping at global
norm 1.0, one-cycle schedule, label smoothing 0.1, random resized crop (bilinear or bicubic at
random) + flip, RandAugment rand-m9-mstd0.5-inc1, random erasing p 0.25, Mixup 0.5 / CutMix
0.5 (switch prob 0.5) and BatchNorm statistics per group of images, bf16 compute.
Hardware: without a target, the authors' 10 devices x 64 images. `:v4-8` (4 TPU v4 chips, 160
images each) and `:h100x8` (one 8xH100 node, 80 each) keep the global batch and learning rate,
with Mixup and BatchNorm groups of 80 images (64 fits neither layout). Each layout fits its target
by `python -m convmixer_jax.benchmark aot --config FILE:TARGET` (docs/accelerators.md).
Expected: 76.94% top-1 (the authors' result).
"""

from convmixer_jax.train.config import imagenet_config, sized_for

GROUPS_OF_80 = {"bn_group_size": 80, "mixup_group_size": 80}
LAYOUTS = {
    "v4-8": {"model.remat": "none", **GROUPS_OF_80},
    "h100x8": {"model.remat": "none", **GROUPS_OF_80},
}


def get_config(target: str = ""):
    c = imagenet_config()
    c.model.name = "convmixer_1024_20_ks9_p14"
    c.model.remat = "none"
    c.num_epochs = 150.0
    return sized_for(c, target, LAYOUTS)
