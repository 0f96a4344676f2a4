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
