"""Runs every test on 8 simulated CPU devices, so sharded code paths are exercised."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the PyTorch reference, torch_convmixer


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """The offline dataset, prepared once per test session."""
    from convmixer_jax.data import synthetic

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    synthetic.prepare(data_dir)
    return data_dir


def write_image_folder(root, counts, size=(20, 28), seed=0, textured=False):
    """Writes ROOT/<split>/<class>/<i>.{jpg,png}; counts: {split: {class: n}}.

    Each image is a flat colour that encodes its class index in the red channel; `textured`
    adds noise to the other two, so that crops and flips change what a model sees.
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
                if textured:
                    pixels[..., 1:] = rng.integers(0, 255, (*size, 2), dtype=np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(pixels).save(folder / f"{i}.{ext}")
    return root


def quickstart_config(data_dir, **overrides):
    """configs/quickstart.py, loaded like --config does, shrunk to a few-second run."""
    spec = importlib.util.spec_from_file_location("quickstart", f"{ROOT}/configs/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data_dir = data_dir
    c.model.width, c.model.depth = 16, 2
    c.batch_size, c.eval_batch_size = 32, 200
    c.num_train_steps = 9
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 3, 6, 3
    c.update(overrides)
    return c


def restore_params(workdir, step):
    """The params saved at `step` in `workdir`, as NumPy arrays."""
    import jax

    path = os.path.join(workdir, "checkpoints", str(step), "model")
    checkpointer = ocp.StandardCheckpointer()
    # Restore onto one local device, whatever topology wrote the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata.tree,
    )
    return checkpointer.restore(path, target)["params"]


def cli_command(*args):
    return [sys.executable, "-m", "convmixer_jax.main", *args]


def run_cli(*args, timeout=600):
    """Runs the real command line to completion."""
    return subprocess.run(
        cli_command(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
