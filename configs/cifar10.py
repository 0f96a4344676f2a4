"""CIFAR-10 with the authors' small script: ConvMixer-256/8 (k5, p2), 25 epochs.

    python -m convmixer_jax.main --config configs/cifar10.py --workdir runs/cifar10

Batch 512, AdamW lr-max 0.05 with the one-cycle shape, weight decay 0.005 on all parameters,
random crop at scale 1, flip, RandAugment (n=2, m=12), no erasing. Expected: ~92.5% top-1 after
25 epochs (the authors' result).
Sized for one GPU/TPU chip (a few minutes); on a 2-core CPU one epoch takes roughly half an hour.
"""

from convmixer_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.name = "convmixer_256_8"
    c.dataset = "cifar10"
    c.eval_split = "test"
    c.image_size = 32
    c.crop_pct = 1.0
    c.crop_area_min = 1.0
    c.crop_aspect_min = 1.0
    c.crop_aspect_max = 1.0
    # The authors use torchvision's RandAugment(num_ops=2, magnitude=12) with 31 magnitude bins:
    # every drawn op applied at 12/30 = 0.4 of its range, i.e. timm's m4 (of 10) with p1.0. The
    # 'increasing' set matches its signed enhance factors (1 +- 0.36), rotate (12 degrees), shear
    # (0.12), translate (0.18 vs 0.181 of the size) and solarize threshold (154 vs 153); it differs
    # in posterize (3 bits kept vs 6), in having Invert and SolarizeAdd instead of Identity, and
    # in filling with the mean colour instead of black.
    c.randaugment = "rand-n2-m4-inc1-p1.0"
    c.mean = (0.4914, 0.4822, 0.4465)
    c.std = (0.2471, 0.2435, 0.2616)
    c.cache_data = True
    c.shuffle_buffer = 50_000
    c.batch_size = 512
    c.num_epochs = 25.0
    c.learning_rate = 0.05
    c.weight_decay = 0.005
    c.weight_decay_all = True
    c.adam_eps = 1e-8
    c.label_smoothing = 0.0
    c.grad_clip_norm = 0.0
    c.dtype = "float32"
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    return c
