"""ImageNet through the real TFDS builder, from miniature but correctly structured ILSVRC tars."""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import ROOT
from convmixer_jax.data import prepare

LABELS_DIR = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012")
SYNSETS = open(os.path.join(LABELS_DIR, "labels.txt")).read().split()
VAL_SYNSETS = open(os.path.join(LABELS_DIR, "validation_labels.txt")).read().split()


def _jpeg(rng, size=(40, 52)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_ilsvrc(manual_dir, classes=(0, 1, 2), per_class=4, num_val=12, seed=0):
    """ILSVRC2012_img_train.tar (one tar per synset) and ILSVRC2012_img_val.tar (real names)."""
    rng = np.random.default_rng(seed)
    os.makedirs(manual_dir, exist_ok=True)
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
        for c in classes:
            synset = SYNSETS[c]
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as per_synset:
                for i in range(per_class):
                    _add(per_synset, f"{synset}_{i + 1}.JPEG", _jpeg(rng))
            _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
        for i in range(num_val):
            _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng))
    return manual_dir


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory):
    manual = write_ilsvrc(str(tmp_path_factory.mktemp("manual")))
    data_dir = str(tmp_path_factory.mktemp("tfds_imagenet"))
    prepare.prepare("imagenet2012", manual, data_dir)
    return data_dir


def test_prepared_splits_and_labels(imagenet_dir):
    builder = tfds.builder("imagenet2012", data_dir=imagenet_dir)
    assert builder.info.splits["train"].num_examples == 12
    assert builder.info.splits["validation"].num_examples == 12
    labels = sorted(int(ex["label"]) for ex in builder.as_dataset(split="train"))
    assert labels == [0] * 4 + [1] * 4 + [2] * 4
    names = builder.info.features["label"].names
    val = {ex["file_name"].numpy().decode(): int(ex["label"])
           for ex in builder.as_dataset(split="validation")}  # fmt: skip
    for name, label in val.items():
        index = int(name.split("_")[-1].split(".")[0]) - 1
        assert names[label] == VAL_SYNSETS[index]


def test_prepare_cli_missing_files(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "convmixer_jax.data.prepare", "imagenet2012",
         f"--manual_dir={tmp_path}", f"--data_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2
    assert "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar not found" in res.stderr


def test_paper_recipe_trains_and_evaluates_on_miniature_imagenet(imagenet_dir, tmp_path):
    """configs/convmixer_1536_20.py with its full recipe, shrunk in size only."""
    import importlib.util

    from convmixer_jax.train import loop
    from convmixer_jax.train.metrics import read_metrics

    spec = importlib.util.spec_from_file_location("c", f"{ROOT}/configs/convmixer_1536_20.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    recipe = {k: c[k] for k in ("randaugment", "random_erase_prob", "mixup_alpha", "cutmix_alpha")}
    assert recipe == {"randaugment": "rand-m9-mstd0.5-inc1", "random_erase_prob": 0.25,
                      "mixup_alpha": 0.5, "cutmix_alpha": 0.5}  # fmt: skip
    c.data_dir = imagenet_dir
    c.model.width, c.model.depth = 16, 2
    c.image_size, c.batch_size, c.eval_batch_size = 28, 8, 8
    c.mixup_group_size, c.bn_group_size = 4, 4
    c.num_train_steps, c.log_every_steps, c.checkpoint_every_steps = 3, 1, 3
    c.dtype = "float32"
    metrics = loop.train_and_evaluate(c, str(tmp_path / "run"))
    # 12 validation images, each counted once: accuracies are multiples of 1/12.
    assert metrics["eval/top1"] * 12 == pytest.approx(round(metrics["eval/top1"] * 12))
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    assert "eval/skipped_images" not in metrics
