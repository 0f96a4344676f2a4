"""Runs every test on 8 simulated CPU devices, so sharded code paths are exercised."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """The offline dataset, prepared once per test session."""
    from convmixer_jax.data import synthetic

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    synthetic.prepare(data_dir)
    return data_dir


def write_image_folder(root, counts, size=(20, 28), seed=0):
    """Writes ROOT/<split>/<class>/<i>.{jpg,png}; counts: {split: {class: n}}.

    Each image is a flat colour that encodes its class index in the red channel.
    """
    rng = np.random.default_rng(seed)
    classes = sorted({c for per_split in counts.values() for c in per_split})
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                value = 40 * classes.index(cls) + 20
                pixels = np.full((*size, 3), value, np.uint8)
                pixels[..., 1:] = rng.integers(0, 255, 2, dtype=np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(pixels).save(folder / f"{i}.{ext}")
    return root
