"""Train random resized crop: fused JPEG decode-and-crop, antialiased resize, bad images."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFile

from convmixer_jax.data import input_pipeline
from convmixer_jax.data.datasets import DataError
from convmixer_jax.train.config import base_config, imagenet_config

ImageFile.MAXBLOCK = 1 << 22  # lets PIL write progressive JPEGs into memory


def _pixels(h, w, seed):
    """Textured content: every chroma edge case shows up in it."""
    rng = np.random.default_rng(seed)
    return (np.cumsum(rng.integers(0, 60, (h, w, 3)), axis=1) % 256).astype(np.uint8)


def _encode(pixels, fmt="JPEG", **kwargs):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kwargs)
    return buf.getvalue()


# 4:4:4, 4:2:2 and 4:2:0 chroma, greyscale, progressive; odd sizes.
JPEGS = [
    _encode(_pixels(123, 181, 0), quality=90, subsampling=0),
    _encode(_pixels(97, 150, 1), quality=75, subsampling=1),
    _encode(_pixels(150, 111, 2), quality=90, subsampling=2),
    _encode(_pixels(64, 90, 3)[..., 0], quality=85),
    _encode(_pixels(131, 77, 4), quality=80, subsampling=2, progressive=True),
]


def _key(i):
    return tf.constant([7, i], tf.int64)


def test_jpeg_crop_decodes_only_the_window_and_equals_decode_then_crop(monkeypatch):
    c = base_config()
    c.crop_area_min = 0.05
    fused_calls = []
    decode_and_crop = tf.image.decode_and_crop_jpeg

    def spy(*args, **kwargs):
        fused_calls.append(1)
        return decode_and_crop(*args, **kwargs)

    monkeypatch.setattr(tf.image, "decode_and_crop_jpeg", spy)
    for jpeg in JPEGS:
        full = tf.io.decode_image(jpeg, channels=3, expand_animations=False)
        for i in range(25):
            begin, size = input_pipeline.crop_window(tf.shape(full), _key(i), c)
            fused = input_pipeline.random_crop(tf.constant(jpeg), _key(i), c)
            np.testing.assert_array_equal(fused, tf.slice(full, begin, size))
    assert len(fused_calls) == 25 * len(JPEGS)
    pixels = _pixels(40, 60, 5)  # other formats: decoded whole, then sliced
    crop = input_pipeline.random_crop(tf.constant(_encode(pixels, "PNG")), _key(0), c)
    begin, size = input_pipeline.crop_window(tf.constant([40, 60, 3]), _key(0), c)
    np.testing.assert_array_equal(crop, tf.slice(pixels, begin, size))
    assert crop.shape[0] < 40 or crop.shape[1] < 60
    assert len(fused_calls) == 25 * len(JPEGS)


def test_train_preprocess_of_a_jpeg_equals_that_of_its_decoded_pixels():
    """Fused (JPEG) and unfused (PNG of the same pixels) paths give identical augmented images,
    with the paper's full augmentation; the same key gives the same image, another key not."""
    c = imagenet_config()
    c.image_size = 64
    for i, jpeg in enumerate(JPEGS):
        png = _encode(tf.io.decode_image(jpeg, channels=3).numpy(), "PNG")
        a = input_pipeline.train_preprocess(tf.constant(jpeg), _key(i), c).numpy()
        b = input_pipeline.train_preprocess(tf.constant(png), _key(i), c).numpy()
        np.testing.assert_array_equal(a, b)
        again = input_pipeline.train_preprocess(tf.constant(jpeg), _key(i), c).numpy()
        np.testing.assert_array_equal(a, again)
        other = input_pipeline.train_preprocess(tf.constant(jpeg), _key(i + 100), c).numpy()
        assert not np.array_equal(a, other)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("source", [96, 20])  # shrink 3x, enlarge 1.6x
def test_train_resize_matches_pil(method, source):
    c = base_config()
    c.image_size, c.train_interpolation, c.horizontal_flip = 32, method, False
    c.crop_area_min = c.crop_aspect_min = c.crop_aspect_max = 1.0  # the whole (square) image
    c.mean, c.std = (0.0, 0.0, 0.0), (1 / 255,) * 3
    pixels = _pixels(source, source, 6)
    out = input_pipeline.train_preprocess(tf.constant(_encode(pixels, "PNG")), _key(0), c).numpy()
    resample = Image.BILINEAR if method == "bilinear" else Image.BICUBIC
    channels = [Image.fromarray(pixels[..., k].astype(np.float32)) for k in range(3)]
    pil = np.stack([np.asarray(ch.resize((32, 32), resample)) for ch in channels], axis=-1)
    np.testing.assert_allclose(out, pil, atol=0.01 if source > 32 else 0.25)
    if source > 32:  # without antialiasing the shrunk image is far from PIL's
        plain = tf.image.resize(pixels, [32, 32], method=method).numpy()
        assert np.abs(plain - pil).max() > 20


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_jpeg_with_a_broken_header_is_skipped_or_named(policy):
    """Passes the structural check (JPEG signature and end marker) but cannot be decoded."""
    c = base_config()
    c.image_size, c.bad_images, c.shuffle_buffer = 16, policy, 8
    good = [_encode(_pixels(30, 40, i), quality=90) for i in range(5)]
    bad = b"\xff\xd8\xff\xe0" + bytes(200) + b"\xff\xd9"
    encoded = [*good[:2], bad, *good[2:]]
    names = [f"{i}.jpg" for i in range(6)]
    records = tf.data.Dataset.from_tensor_slices((encoded, list(range(6)), names))
    split = input_pipeline.ProcessSplit(records, 6, 6)
    ds = input_pipeline.train_batches(split, 6, c, local_batch=5)
    batches = input_pipeline.as_numpy(ds)
    if policy == "error":
        with pytest.raises(DataError, match="bad_images='skip'"):
            next(batches)
        return
    labels = next(batches)["label"]
    assert sorted(labels) == [0, 1, 3, 4, 5]  # one epoch without the bad image
