"""Quickstart: a tiny ConvMixer on the built-in offline dataset (synthetic_shapes, 10 classes).

    python -m convmixer_jax.main --config configs/quickstart.py --workdir runs/quickstart

Sized for a 2-core laptop CPU: trains in a few minutes and reaches >= 90% eval top-1 (see the
README for the measured time and accuracy). Needs no download: the dataset is generated into
data_dir (TFDS's default directory) on first use.
"""

from convmixer_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.name = "convmixer_tiny"
    c.dataset = "synthetic_shapes"
    c.image_size = 32
    c.crop_pct = 1.0
    c.crop_area_min = 0.35
    c.mean = (0.5, 0.5, 0.5)
    c.std = (0.25, 0.25, 0.25)
    c.cache_data = True
    c.shuffle_buffer = 5000
    c.batch_size = 128
    c.num_epochs = 3.0
    c.learning_rate = 0.01
    c.weight_decay = 0.005
    c.adam_eps = 1e-8
    c.dtype = "float32"
    c.log_every_steps = 10
    c.eval_every_steps = 50
    c.checkpoint_every_steps = 50
    return c
