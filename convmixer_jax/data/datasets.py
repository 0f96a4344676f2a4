"""Finding a dataset's TFDS builder, with a clear error when its data is not there."""

from __future__ import annotations

import os

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from convmixer_jax.data import synthetic

EVAL_SPLITS = ("validation", "test", "val")
# The single-label feature; imagenet2012_real calls its original ImageNet label 'original_label'.
LABEL_FEATURES = ("label", "original_label")


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


def extra_eval_builder(
    name: str, config: ml_collections.ConfigDict, num_classes: int
) -> tfds.core.DatasetBuilder:
    """The prepared builder of the extra eval dataset `name` (read from config.data_dir).

    Never downloads: a missing dataset is a DataError saying how to prepare it, raised before
    anything is compiled, as is one whose labels do not match the model's classes.
    """
    data_dir = config.data_dir or default_data_dir()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown dataset or config name
        raise DataError(
            f"extra_eval_datasets: no TFDS dataset {name!r} ({str(e).splitlines()[0]})"
        ) from None
    if not builder.is_prepared():
        if name.split(":")[0] == "imagenet2012_real":
            manual = os.path.join(data_dir, "downloads", "manual")
            how = (
                f"put ILSVRC2012_img_val.tar in {manual!r} and run `python -m "
                f"convmixer_jax.data.prepare {name} --manual_dir {manual} --data_dir {data_dir}` "
                "where the internet is reachable (it downloads the ReaL labels)"
            )
        else:
            how = (
                f"run `python -m convmixer_jax.data.prepare {name} --data_dir {data_dir}` where "
                "the internet is reachable"
            )
        raise DataError(
            f"{name} is not prepared in {data_dir!r}: {how}, or remove it from extra_eval_datasets"
        )
    label = label_feature(builder)
    classes = builder.info.features[label].num_classes if label else "no"
    if classes != num_classes:
        raise DataError(
            f"extra_eval_datasets: {name} has {classes} classes, the model {num_classes}; "
            "evaluate only datasets with the model's classes"
        )
    default_eval_split(builder)
    return builder


def label_feature(builder: tfds.core.DatasetBuilder) -> str | None:
    """The name of the dataset's single-label feature, if it has one."""
    return next((k for k in LABEL_FEATURES if k in builder.info.features.keys()), None)


def default_eval_split(builder: tfds.core.DatasetBuilder) -> str:
    """The first of validation/test/val the dataset has."""
    splits = list(builder.info.splits)
    for split in EVAL_SPLITS:
        if split in splits:
            return split
    raise DataError(f"{builder.name} has no eval split among {splits}")


def eval_split(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> str:
    """The configured eval split, or the first of validation/test/val the dataset has."""
    splits = list(builder.info.splits)
    if config.eval_split:
        if config.eval_split not in splits:
            raise DataError(f"eval_split {config.eval_split!r} is not in {splits}; use one of them")
        return config.eval_split
    if not any(split in splits for split in EVAL_SPLITS):
        raise DataError(f"no eval split among {splits}; set eval_split to one of them")
    return default_eval_split(builder)


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
    return builder.info.features["label"].num_classes
