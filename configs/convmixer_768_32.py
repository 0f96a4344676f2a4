"""ConvMixer-768/32 (h=768, d=32, k=7, p=7, ReLU), 21,110,248 parameters,
on ImageNet-1k with the paper's recipe.

    python -m convmixer_jax.main --config configs/convmixer_768_32.py --workdir DIR \
        --config.data_dir=TFDS_DATA_DIR

Recipe (the authors' timm settings): global batch 640, 300 epochs, AdamW (lr 0.01, betas
0.9/0.999, eps 1e-3, weight decay 2e-5 on >= 2-D parameters only), gradient clipping at global
norm 1.0, one-cycle schedule, label smoothing 0.1, random resized crop + flip, bf16 compute.
Hardware: the authors' 10-GPU setup; one TPU v4-32 slice or an 8xH100 node.
Expected: 80.16% top-1 (the authors' result with their full augmentation: RandAugment, Mixup,
CutMix and random erasing, which this config does not enable yet).
"""

from convmixer_jax.config import base_config


def get_config():
    c = base_config()
    c.model.name = "convmixer_768_32"
    c.dataset = "imagenet2012"
    c.num_epochs = 300.0
    c.crop_pct = 0.96
    c.eval_every_steps = 10_000
    c.checkpoint_every_steps = 2_000
    return c
