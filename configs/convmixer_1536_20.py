"""ConvMixer-1536/20 (h=1536, d=20, k=9, p=7, GELU), 51,625,960 parameters,
on ImageNet-1k with the paper's recipe.

    python -m convmixer_jax.main --config configs/convmixer_1536_20.py:v4-32 --workdir DIR \
        --config.data_dir=TFDS_DATA_DIR

Recipe (the authors' timm settings): global batch 640, 150 epochs, AdamW (lr 0.01, betas
0.9/0.999, eps 1e-3, weight decay 2e-5 on >= 2-D parameters only), gradient clipping at global
norm 1.0, one-cycle schedule, label smoothing 0.1, random resized crop (bilinear or bicubic at
random) + flip, RandAugment rand-m9-mstd0.5-inc1, random erasing p 0.25, Mixup 0.5 / CutMix
0.5 (switch prob 0.5) and BatchNorm statistics per group of images, bf16 compute.
Hardware: the authors trained on 10 GPUs with 64 images each (~9 days on RTX8000s): this file
without a target, which needs 10 (or 5, 20, 40) devices. The targets keep the global batch and
learning rate: `:v4-32` (16 TPU v4 chips, 40 images each), `:v5e-16`, `:v5p-32`, `:v6e-8` and
`:h100x8` (one 8xH100 node, 80 each). 64 neither divides 40 or 80 nor is a multiple of them, so
there Mixup and BatchNorm groups hold 80 images (two chips, or one GPU). Each layout fits its
target by `python -m convmixer_jax.benchmark aot --config FILE:TARGET` (docs/accelerators.md).
Expected: 81.37% top-1 (the authors' result).
"""

from convmixer_jax.train.config import imagenet_config, sized_for

GROUPS_OF_80 = {"bn_group_size": 80, "mixup_group_size": 80}
LAYOUTS = {
    "v4-32": {"model.remat": "none", **GROUPS_OF_80},
    "v5e-16": {"model.remat": "none", **GROUPS_OF_80},
    "v5p-32": {"model.remat": "none", **GROUPS_OF_80},
    "v6e-8": {"model.remat": "none", **GROUPS_OF_80},
    "h100x8": {"model.remat": "none", **GROUPS_OF_80},
}


def get_config(target: str = ""):
    c = imagenet_config()
    c.model.name = "convmixer_1536_20"
    c.model.remat = "none"  # 64 images per device fit a 24 GB GPU; 'block' for 16 GB ones
    c.num_epochs = 150.0
    return sized_for(c, target, LAYOUTS)
