"""Finding a dataset's TFDS builder, with a clear error when its data is not there."""

from __future__ import annotations

import os

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from convmixer_jax.data import synthetic

EVAL_SPLITS = ("validation", "test", "val")


class DataError(RuntimeError):
    """The dataset is missing or unreadable; the message says where the data should be."""


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared builder for `config.dataset` (preparing the offline dataset on first use)."""
    name, data_dir = config.dataset, config.data_dir or default_data_dir()
    if name == "synthetic_shapes":
        return synthetic.prepare(data_dir)
    if name == "image_folder":
        if not tf.io.gfile.isdir(data_dir):
            raise DataError(
                f"data_dir {data_dir!r} does not exist; point it at a tree "
                "ROOT/<split>/<class>/<image>"
            )
        try:
            return tfds.folder_dataset.ImageFolder(data_dir)
        except Exception as e:  # TFDS raises several types for malformed trees.
            raise DataError(f"cannot read image folder {data_dir!r}: {e}") from None
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    if name == "imagenet2012":
        manual = os.path.join(data_dir, "downloads", "manual")
        raise DataError(
            f"imagenet2012 is not prepared in {data_dir!r}: put ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar in {manual!r} and run `tfds build imagenet2012 "
            f"--data_dir {data_dir}`, or set data_dir to where it is prepared"
        )
    try:
        builder.download_and_prepare()
    except Exception as e:  # no network, full disk, ...: say so in one line.
        raise DataError(
            f"{name} is not prepared in {data_dir!r} and preparing it failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); prepare it where the internet is "
            "reachable and set data_dir"
        ) from None
    return builder


def eval_split(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> str:
    """The configured eval split, or the first of validation/test/val the dataset has."""
    splits = list(builder.info.splits)
    if config.eval_split:
        if config.eval_split not in splits:
            raise DataError(f"eval_split {config.eval_split!r} is not in {splits}; use one of them")
        return config.eval_split
    for split in EVAL_SPLITS:
        if split in splits:
            return split
    raise DataError(f"no eval split among {splits}; set eval_split to one of them")


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
    return builder.info.features["label"].num_classes
