"""Input pipelines: determinism, exact resume position, exact eval counting, per-host splits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image_folder
from convmixer_jax.data import datasets, input_pipeline
from convmixer_jax.train.config import base_config


def _config(data_dir, **overrides):
    c = base_config()
    c.dataset = "synthetic_shapes"
    c.data_dir = data_dir
    c.image_size = 32
    c.crop_pct = 1.0
    c.cache_data = True
    c.shuffle_buffer = 1000
    c.dtype = "float32"
    c.update(overrides)
    return c


def _batches(ds, n):
    it = input_pipeline.as_numpy(ds)
    return [next(it) for _ in range(n)]


def test_train_stream_is_deterministic_and_resumes_exactly(synthetic_data_dir):
    c = _config(synthetic_data_dir)
    builder = datasets.get_builder(c)
    # 5000 examples / 64 per batch: steps 78..80 cross the epoch boundary.
    full = _batches(input_pipeline.train_dataset(builder, c, local_batch=64), 81)
    again = _batches(input_pipeline.train_dataset(builder, c, local_batch=64), 3)
    for a, b in zip(full, again, strict=False):
        np.testing.assert_array_equal(a["image"], b["image"])
    resumed = _batches(input_pipeline.train_dataset(builder, c, local_batch=64, start_step=77), 4)
    for a, b in zip(full[77:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert full[0]["image"].shape == (64, 32, 32, 3) and full[0]["image"].dtype == np.float32
    # Different epochs see a different order; a different seed a different stream.
    assert not np.array_equal(full[0]["label"], full[79]["label"])
    other = _batches(
        input_pipeline.train_dataset(builder, _config(synthetic_data_dir, seed=1), local_batch=64),
        1,
    )
    assert not np.array_equal(other[0]["image"], full[0]["image"])
    # One epoch covers every example once: balanced labels over the first 78 batches.
    labels = np.concatenate([b["label"] for b in full[:78]])
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 4992 and counts.min() >= 490


def test_images_leave_the_host_in_the_compute_dtype(synthetic_data_dir):
    builder = datasets.get_builder(_config(synthetic_data_dir))
    out = {}
    for dtype in ("float32", "bfloat16"):
        c = _config(synthetic_data_dir, dtype=dtype)
        train = _batches(input_pipeline.train_dataset(builder, c, local_batch=16), 2)
        evals = _batches(input_pipeline.eval_dataset(builder, c, "test", local_batch=600), 2)
        out[dtype] = [b["image"] for b in train + evals]  # the second eval batch is padded
    for f32, bf16 in zip(out["float32"], out["bfloat16"], strict=True):
        assert f32.dtype == np.float32 and bf16.dtype == jnp.bfloat16
        np.testing.assert_array_equal(bf16, f32.astype(jnp.bfloat16))
        assert np.abs(f32).max() > 0.5  # real images, not padding only


def test_eval_counts_every_example_once_with_padding(synthetic_data_dir):
    c = _config(synthetic_data_dir)
    builder = datasets.get_builder(c)
    assert datasets.eval_split(builder, c) == "test"
    batches = list(
        input_pipeline.as_numpy(input_pipeline.eval_dataset(builder, c, "test", local_batch=96))
    )
    assert len(batches) == 11  # ceil(1000 / 96)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 1000 and mask[:1000].all() and not mask[1000:].any()
    labels = np.concatenate([b["label"] for b in batches])[:1000]
    np.testing.assert_array_equal(np.bincount(labels), [100] * 10)


@pytest.mark.parametrize("dataset", ["synthetic_shapes", "image_folder"])
def test_process_shares_partition_the_split(dataset, synthetic_data_dir, tmp_path, monkeypatch):
    if dataset == "image_folder":
        write_image_folder(tmp_path, {"train": {"a": 7, "b": 6}})
        c = _config(str(tmp_path), dataset="image_folder")
        split, total = "train", 13
    else:
        c = _config(synthetic_data_dir)
        split, total = "test", 1000
    builder = datasets.get_builder(c)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    seen = []
    for index in range(3):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        share = input_pipeline.process_split(builder, split, drop_remainder=False)
        images = [r[0].numpy() for r in share.records]
        assert len(images) == share.num_examples and share.max_examples == -(-total // 3)
        seen += images
        train_share = input_pipeline.process_split(builder, split, drop_remainder=True)
        assert train_share.num_examples == total // 3
        assert len(list(train_share.records)) == total // 3
    assert len(seen) == total and len(set(seen)) == total  # each example exactly once


def test_image_folder_labels_and_classes(tmp_path):
    write_image_folder(
        tmp_path, {"train": {"cat": 3, "dog": 3, "eel": 2}, "val": {"cat": 2, "dog": 1, "eel": 1}}
    )
    c = _config(
        str(tmp_path),
        dataset="image_folder",
        image_size=16,
        mean=(0, 0, 0),
        std=(1 / 255, 1 / 255, 1 / 255),
    )
    builder = datasets.get_builder(c)
    assert datasets.num_classes(builder) == 3
    assert datasets.eval_split(builder, c) == "val"
    batches = list(
        input_pipeline.as_numpy(input_pipeline.eval_dataset(builder, c, "val", local_batch=8))
    )
    (batch,) = batches
    real = batch["mask"] == 1
    assert real.sum() == 4
    # Red channel encodes the class (JPEG is lossy: within a few grey levels).
    red = batch["image"][real][..., 0].mean(axis=(1, 2))
    np.testing.assert_allclose(red, 40 * batch["label"][real] + 20, atol=3)


def test_missing_data_errors(tmp_path):
    with pytest.raises(datasets.DataError, match="does not exist"):
        datasets.get_builder(_config(str(tmp_path / "nope"), dataset="image_folder"))
    with pytest.raises(datasets.DataError, match="ILSVRC2012_img_train.tar"):
        datasets.get_builder(_config(str(tmp_path), dataset="imagenet2012"))


def test_eval_preprocess_resizes_shorter_side_and_center_crops():
    c = _config(
        "",
        image_size=16,
        crop_pct=0.5,
        mean=(0, 0, 0),
        std=(1 / 255,) * 3,
        eval_interpolation="bilinear",
    )
    # 20 x 40 image: left half 0, right half 200. Resize shorter side to 32 -> 32 x 64,
    # center crop 16 x 16 spans columns 24..40: 8 columns of each half.
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 20:] = 200
    encoded = tf.io.encode_png(image)
    out = input_pipeline.eval_preprocess(encoded, c).numpy()
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out[:, :6], 0, atol=1e-3)
    np.testing.assert_allclose(out[:, 10:], 200, atol=1e-3)


def test_train_preprocess_crop_and_flip_semantics():
    c = _config(
        "",
        image_size=8,
        mean=(0, 0, 0),
        std=(1 / 255,) * 3,
        crop_area_min=1.0,
        crop_aspect_min=1.0,
        crop_aspect_max=1.0,
    )
    # Full-image crop of a 8x8 image with a bright left column: either unchanged or mirrored.
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 0] = 255
    encoded = tf.io.encode_png(image)
    outs = [
        input_pipeline.train_preprocess(encoded, tf.constant([0, i], tf.int64), c).numpy()
        for i in range(16)
    ]
    flipped = [bool(o[0, 7, 0] > 128) for o in outs]
    for o, f in zip(outs, flipped, strict=True):
        np.testing.assert_allclose(o, image[:, ::-1] if f else image, atol=1e-3)
    assert 0 < sum(flipped) < 16
