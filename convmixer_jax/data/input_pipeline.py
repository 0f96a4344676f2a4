"""tf.data input pipelines: each host reads its own share of a TFDS split and augments it.

Train: an endless, deterministic stream. Every epoch of the host's share is shuffled with a seed
derived from (seed, epoch), and every example's augmentation draws from a stateless key derived
from (seed, epoch, the example's index in the whole split), whichever host reads it. The stream is
a pure function of the config and the host layout; resuming at step s starts at exactly the
example it would have reached.

Eval: every example of the split exactly once over all hosts; each host pads its share to the same
number of batches and marks padding with mask 0.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from convmixer_jax.data import augment
from convmixer_jax.data.datasets import DataError, label_feature

AUTOTUNE = tf.data.AUTOTUNE


class ProcessSplit(NamedTuple):
    # (encoded image, label, name[, ReaL label ids]) records of this process's share
    records: tf.data.Dataset
    num_examples: int  # in this process's share
    max_examples: int  # in the largest share of any process
    offset: int = 0  # local example i is example offset + i * stride of the whole split
    stride: int = 1


# Features that name an example's source file (ImageFolder, imagenet2012).
_NAME_FEATURES = ("image/filename", "file_name")
# imagenet2012_real's multi-label feature: the set of classes judged correct for the image.
REAL_FEATURE = "real_label"
_BAD_IMAGE = "undecodable image"


def real_label_classes(builder) -> int | None:
    """The class count of the builder's ReaL label sets, or None if it has none."""
    features = builder.info.features
    return features[REAL_FEATURE].feature.num_classes if REAL_FEATURE in features.keys() else None


def _records(builder, split: str) -> tf.data.Dataset:
    """(encoded image, label, file name or ''[, ReaL label ids]), in the split's stored order."""
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    keys = builder.info.features.keys()
    names = [f for f in _NAME_FEATURES if f in keys]
    label = label_feature(builder)
    real = REAL_FEATURE in keys

    def record(ex):
        name = ex[names[0]] if names else tf.constant("")
        rec = (ex["image"], tf.cast(ex[label], tf.int32), name)
        return (*rec, tf.cast(ex[REAL_FEATURE], tf.int32)) if real else rec

    return ds.map(record)


def _is_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    return tf.strings.substr(encoded, 0, 3) == b"\xff\xd8\xff"


def looks_like_image(encoded: tf.Tensor) -> tf.Tensor:
    """Cheap structural check: a JPEG/PNG/GIF/BMP signature, and an intact JPEG/PNG end marker.

    Catches empty, garbage and truncated files before decoding, where TensorFlow's own error
    would neither name the file nor let the pipeline go on.
    """
    size = tf.strings.length(encoded)
    head = tf.strings.substr(encoded, 0, 8)
    tail = tf.io.decode_raw(tf.strings.substr(encoded, tf.maximum(size - 64, 0), 64), tf.uint8)
    jpeg_end = tf.reduce_any((tail[:-1] == 0xFF) & (tail[1:] == 0xD9))
    png_end = tf.strings.substr(encoded, tf.maximum(size - 8, 0), 8) == b"IEND\xaeB`\x82"
    jpeg = _is_jpeg(encoded) & jpeg_end
    png = (head == b"\x89PNG\r\n\x1a\n") & png_end
    other = (tf.strings.substr(head, 0, 4) == b"GIF8") | (tf.strings.substr(head, 0, 2) == b"BM")
    return jpeg | png | other


def _guard_images(ds: tf.data.Dataset, config, skipped: tf.Variable | None, record_of):
    """Drops (and counts in `skipped`, and prints) bad images, or fails naming the file.

    `record_of(element)` returns the element's (encoded, label, name, ...) record.
    """
    if config.bad_images == "error":

        def check(*element):
            encoded, _, name = record_of(*element)[:3]
            ok = looks_like_image(encoded)
            with tf.control_dependencies([tf.debugging.Assert(ok, [_BAD_IMAGE, name])]):
                return tf.nest.map_structure(tf.identity, element)

        return ds.map(check)

    def keep(*element):
        encoded, _, name = record_of(*element)[:3]

        def drop():
            ops = [tf.print("WARNING: skipping", _BAD_IMAGE, name, output_stream=sys.stderr)]
            if skipped is not None:
                ops.append(skipped.assign_add(1))
            with tf.control_dependencies(ops):
                return tf.constant(False)

        return tf.cond(looks_like_image(encoded), lambda: tf.constant(True), drop)

    return ds.filter(keep)


def counter() -> tf.Variable:
    """A host-side count (e.g. of skipped images) that pipelines update as they run."""
    return tf.Variable(0, dtype=tf.int64, trainable=False)


def _finish_decoding(ds: tf.data.Dataset, config) -> tf.data.Dataset:
    # A file that passes the structural check but still fails to decode is skipped too (TF logs
    # it); with bad_images='error' its error propagates and as_numpy reports it.
    return ds.ignore_errors(log_warning=True) if config.bad_images == "skip" else ds


def process_split(builder, split: str, *, drop_remainder: bool) -> ProcessSplit:
    """This process's share of `split`: equal shares for training, near-equal ones for eval."""
    count, index = jax.process_count(), jax.process_index()
    total = builder.info.splits[split].num_examples
    if count == 1:
        return ProcessSplit(_records(builder, split), total, total)
    if isinstance(builder, tfds.folder_dataset.ImageFolder):  # no sub-split support there
        records = _records(builder, split).shard(count, index)
        mine, offset, stride = len(range(index, total, count)), index, count
    else:
        if drop_remainder:  # contiguous equal shares of total // count examples
            sub = tfds.split_for_jax_process(split, drop_remainder=True)
            offset = index * (total // count)
        else:
            sub = tfds.even_splits(split, n=count, drop_remainder=False)[index]
            offset = 0  # only used for training keys
        records = _records(builder, sub)
        mine, stride = builder.info.splits[sub].num_examples, 1
    if drop_remainder:
        share = total // count
        return ProcessSplit(records.take(share), share, share, offset, stride)
    return ProcessSplit(records, mine, math.ceil(total / count), offset, stride)


def _normalize(image: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
    mean = tf.constant(config.mean, tf.float32) * 255.0
    std = tf.constant(config.std, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std


def _decode(encoded: tf.Tensor) -> tf.Tensor:
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _resize(image: tf.Tensor, size: int, method: str, key: tf.Tensor) -> tf.Tensor:
    """Resizes to size x size; method 'random' picks bilinear or bicubic per image (as timm).

    Antialiased when shrinking, as PIL's resize (timm's) is: TensorFlow's antialiased kernels
    widen with the scale factor and match PIL's to ~0.003 grey levels. When enlarging they
    equal the plain kernels (to ~0.2 grey levels), which are faster, so those are used there.
    """

    def resize(method: str) -> tf.Tensor:
        shrink = tf.reduce_any(tf.shape(image)[:2] > size)
        return tf.cond(
            shrink,
            lambda: tf.image.resize(image, [size, size], method=method, antialias=True),
            lambda: tf.image.resize(image, [size, size], method=method),
        )

    if method != "random":
        return resize(method)
    bicubic = tf.random.stateless_uniform([], key) < 0.5
    return tf.cond(bicubic, lambda: resize("bicubic"), lambda: resize("bilinear"))


# Columns decoded on either side of a JPEG crop window and then dropped (one 16-pixel MCU of
# 4:2:0 / 4:2:2 JPEGs). libjpeg upsamples subsampled chroma at the edges of a cropped decode
# without the neighbouring samples, which changes the outermost columns; with this margin the
# kept pixels equal a full decode's.
_JPEG_CROP_MARGIN = 16


def crop_window(shape: tf.Tensor, key: tf.Tensor, config: ml_collections.ConfigDict):
    """The random resized crop's (begin, size) for an image of `shape` (timm's area/ratio)."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.zeros([1, 0, 4]),
        seed=key,
        min_object_covered=0.0,
        aspect_ratio_range=(config.crop_aspect_min, config.crop_aspect_max),
        area_range=(config.crop_area_min, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def random_crop(encoded: tf.Tensor, key: tf.Tensor, config: ml_collections.ConfigDict):
    """Decodes the random resized crop of an encoded image, uint8 (h, w, 3).

    A JPEG's window comes from its header and only that window is decoded (about half the
    decoding time for small crops: entropy decoding still reads the rows above it); other
    formats are decoded whole and sliced. Both give the same pixels for the same key.
    """

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        begin, size = crop_window(shape, key, config)
        left = tf.maximum(begin[1] - _JPEG_CROP_MARGIN, 0)
        right = tf.minimum(begin[1] + size[1] + _JPEG_CROP_MARGIN, shape[1])
        window = tf.stack([begin[0], left, size[0], right - left])
        image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
        return image[:, begin[1] - left : begin[1] - left + size[1]]

    def other():
        image = _decode(encoded)
        begin, size = crop_window(tf.shape(image), key, config)
        return tf.slice(image, begin, size)

    return tf.cond(_is_jpeg(encoded), jpeg, other)


def train_preprocess(
    encoded: tf.Tensor, key: tf.Tensor, config: ml_collections.ConfigDict
) -> tf.Tensor:
    """Decode, random resized crop, flip, RandAugment, normalise, random erasing.

    All randomness comes from `key`.
    """
    # The first two subkeys do not depend on how many are split off.
    crop_key, flip_key, resize_key, augment_key, erase_key = tf.unstack(
        tf.random.experimental.stateless_split(key, 5)
    )
    image = random_crop(encoded, crop_key, config)
    image = _resize(image, config.image_size, config.train_interpolation, resize_key)
    if config.horizontal_flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_key)
    if config.randaugment:
        image = tf.clip_by_value(tf.round(image), 0.0, 255.0)  # timm augments 8-bit images
        fill = tuple(min(255, round(255 * m)) for m in config.mean)
        policy = augment.parse_randaugment(config.randaugment)
        image = augment.rand_augment(image, augment_key, policy, fill)
    image = _normalize(image, config)
    if config.random_erase_prob > 0:
        image = augment.random_erase(image, erase_key, prob=config.random_erase_prob)
    return image


def eval_preprocess(encoded: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
    """Decode, resize the shorter side to floor(size / crop_pct), center crop, normalise."""
    image = _decode(encoded)
    size = config.image_size
    resize = math.floor(size / config.crop_pct)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.floor(shape * scale), tf.int32), resize)
    image = tf.image.resize(image, new_shape, method=config.eval_interpolation, antialias=True)
    top = (new_shape[0] - size + 1) // 2
    left = (new_shape[1] - size + 1) // 2
    image = image[top : top + size, left : left + size]
    return _normalize(tf.reshape(image, [size, size, 3]), config)


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    return options


def train_dataset(
    builder,
    config: ml_collections.ConfigDict,
    *,
    local_batch: int,
    start_step: int = 0,
    skipped: tf.Variable | None = None,
) -> tf.data.Dataset:
    """Endless batches of this process's share, starting where step `start_step` would be.

    Bad images are skipped and counted in `skipped` (or stop the run; see config.bad_images).
    """
    split = process_split(builder, config.train_split, drop_remainder=True)
    split_size = builder.info.splits[config.train_split].num_examples
    return train_batches(
        split, split_size, config, local_batch=local_batch, start_step=start_step, skipped=skipped
    )


def train_batches(
    split: ProcessSplit,
    split_size: int,
    config: ml_collections.ConfigDict,
    *,
    local_batch: int,
    start_step: int = 0,
    skipped: tf.Variable | None = None,
) -> tf.data.Dataset:
    """The train stream of `split` (this process's share of a split of `split_size` examples).

    Images leave the host in the compute dtype (config.dtype), which the model casts them to
    first anyway: bfloat16 halves the bytes sent to the devices."""
    if split.num_examples < local_batch:
        raise DataError(
            f"the {config.train_split!r} split has {split.num_examples} examples per process, "
            f"fewer than one batch ({local_batch}); lower batch_size"
        )
    records = split.records.cache() if config.cache_data else split.records
    records = records.enumerate()
    first_epoch, offset = divmod(start_step * local_batch, split.num_examples)
    # Keys depend on the example's index in the whole split, not on the process reading it.
    base_key = tf.constant([config.seed, 0], tf.int64)
    buffer = min(config.shuffle_buffer, split.num_examples)

    def epoch(e):
        shuffled = records.shuffle(buffer, seed=config.seed * 1_000_003 + e)
        return shuffled.map(lambda i, rec: (e * split_size + split.offset + i * split.stride, rec))

    def preprocess(position, rec):
        key = tf.random.experimental.stateless_fold_in(base_key, position)
        image = tf.cast(train_preprocess(rec[0], key, config), config.dtype)
        return {"image": image, "label": rec[1]}

    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch).skip(offset)
    ds = _guard_images(ds, config, skipped, lambda position, rec: rec)
    ds = _finish_decoding(ds.map(preprocess, num_parallel_calls=AUTOTUNE), config)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE)
    return ds.with_options(_options())


def eval_dataset(
    builder, config: ml_collections.ConfigDict, split: str, *, local_batch: int
) -> tf.data.Dataset:
    """Padded batches {'image','label','mask'[,'real']} of this process's share.

    Every process yields the same number of batches; padding examples have mask 0. Datasets
    with ReaL labels (imagenet2012_real) add 'real', each image's label set as a multi-hot
    bool vector (all False for padding and for images whose set is empty).
    """
    share = process_split(builder, split, drop_remainder=False)
    num_batches = math.ceil(share.max_examples / local_batch)
    size = config.image_size
    real_classes = real_label_classes(builder)

    def preprocess(encoded, label, name, *real):
        image = tf.cast(eval_preprocess(encoded, config), config.dtype)
        example = {"image": image, "label": label, "mask": tf.constant(1, tf.int32)}
        if real:
            counts = tf.math.bincount(real[0], minlength=real_classes, maxlength=real_classes)
            example["real"] = counts > 0
        return example

    pad = {
        "image": tf.zeros([size, size, 3], config.dtype),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0, tf.int32),
    }
    if real_classes:
        pad["real"] = tf.zeros([real_classes], tf.bool)
    padding = tf.data.Dataset.from_tensors(pad).repeat()
    records = _guard_images(share.records, config, None, lambda *rec: rec)
    ds = _finish_decoding(records.map(preprocess, num_parallel_calls=AUTOTUNE), config)
    if config.cache_data:
        ds = ds.cache()
    ds = ds.concatenate(padding).take(num_batches * local_batch)
    ds = ds.batch(local_batch).prefetch(AUTOTUNE)
    return ds.with_options(_options())


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """NumPy batches; a bad image (with bad_images='error') becomes a DataError naming it."""
    batches = iter(tfds.as_numpy(ds))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            found = re.search(rf"\[{_BAD_IMAGE}\] \[(.*?)\]", e.message)
            what = f"{_BAD_IMAGE} {found.group(1)}" if found else e.message.splitlines()[0]
            raise DataError(f"{what}; remove or replace it, or set bad_images='skip'") from None
        yield batch
