"""Tests for the offline ``synthetic_shapes`` TFDS dataset."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from convmixer_jax.data import synthetic as syn

FILLED = ("disk", "square", "diamond", "triangle_up", "triangle_down", "plus", "x_cross", "hbar")
HOLLOW = ("ring", "frame")


def _centre_pixel(image: np.ndarray, info: syn.ExampleInfo) -> np.ndarray:
    return image[int(info.cy), int(info.cx)].astype(np.float64)


def test_render_is_deterministic_and_well_formed():
    for index in (0, 7, 123):
        a, la = syn.render_example("train", index)
        b, lb = syn.render_example("train", index)
        assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
        assert la == lb == index % 10
        np.testing.assert_array_equal(a, b)
    # Different indices (even of the same class) give different images.
    assert not np.array_equal(syn.render_example("train", 3)[0], syn.render_example("train", 13)[0])
    assert not np.array_equal(syn.render_example("train", 3)[0], syn.render_example("train", 4)[0])


def test_splits_differ():
    for index in range(20):
        tr, ltr = syn.render_example("train", index)
        te, lte = syn.render_example("test", index)
        assert ltr == lte
        assert not np.array_equal(tr, te)
    with pytest.raises(ValueError):
        syn.render_example("validation", 0)


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_balanced(split):
    n = syn.SPLIT_SIZES[split]
    labels = np.array([i % syn.NUM_CLASSES for i in range(n)])  # cheap: label is index % 10
    assert np.array_equal(np.bincount(labels), np.full(10, n // 10))
    # and the renderer agrees with that rule
    assert [syn.render_example(split, i)[1] for i in range(25)] == list(labels[:25])


def test_shape_masks_semantics():
    m = {
        name: lambda u, v, k=k: bool(syn.shape_mask(k, np.float64(u), np.float64(v)))
        for k, name in enumerate(syn.CLASS_NAMES)
    }
    # Filled shapes cover their centre; hollow ones do not.
    for name in FILLED:
        assert m[name](0.0, 0.0), name
    for name in HOLLOW:
        assert not m[name](0.0, 0.0), name
    assert m["ring"](0.75, 0.0) and not m["ring"](0.75, 0.75)  # annulus vs corner
    assert m["frame"](0.8, 0.8) and m["square"](0.8, 0.8) and not m["disk"](0.8, 0.8)
    assert m["diamond"](0.45, 0.45) and not m["diamond"](0.7, 0.7)
    # Triangles: v points down, so triangle_up is wide at the bottom (v > 0).
    assert m["triangle_up"](0.8, 0.85) and not m["triangle_up"](0.8, -0.85)
    assert m["triangle_down"](0.8, -0.85) and not m["triangle_down"](0.8, 0.85)
    assert m["plus"](0.0, 0.9) and m["plus"](0.9, 0.0) and not m["plus"](0.7, 0.7)
    assert m["x_cross"](0.7, 0.7) and m["x_cross"](-0.7, 0.7) and not m["x_cross"](0.0, 0.8)
    assert m["hbar"](0.9, 0.0) and not m["hbar"](0.0, 0.6)

    # On a symmetric grid: every mask is mirror-symmetric left/right, and all are distinct.
    g = (np.arange(64) + 0.5) / 32 - 1.0
    u, v = g[None, :], g[:, None]
    masks = [syn.shape_mask(k, u, v) for k in range(10)]
    for k, mask in enumerate(masks):
        np.testing.assert_array_equal(mask, mask[:, ::-1], err_msg=syn.CLASS_NAMES[k])
        assert 0.1 < mask.mean() < 0.85, syn.CLASS_NAMES[k]
    for a, b in itertools.combinations(range(10), 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.85, (syn.CLASS_NAMES[a], syn.CLASS_NAMES[b], iou)  # disk~square: 0.81


def test_rendered_shape_colour_at_centre():
    for index in range(200):
        image, info = syn.render_example_with_info("test", index)
        name = syn.CLASS_NAMES[info.label]
        diff = np.abs(_centre_pixel(image, info) - info.color).mean()
        if name in HOLLOW:
            assert diff > 35.0, (index, name, diff)  # background shows through the hole
        else:
            assert diff < 15.0, (index, name, diff)  # shape colour (+ mild noise)
        # Shape fits in the image with the documented size range.
        assert 0.45 * 16 <= info.half <= 0.8 * 16
        assert info.half <= info.cy <= 32 - info.half and info.half <= info.cx <= 32 - info.half
        # Colour contrasts with the background: corners are mostly background.
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]].astype(np.float64)
        far = np.abs(corners - info.color).mean(axis=1)
        assert np.max(far) > 35.0, (index, name)


def test_prepare_and_load_roundtrip(tmp_path):
    builder = syn.prepare(str(tmp_path))
    assert builder.name == "synthetic_shapes"
    assert str(builder.info.version) == "1.0.0"
    assert builder.info.splits["train"].num_examples == syn.TRAIN_SIZE
    assert builder.info.splits["test"].num_examples == syn.TEST_SIZE
    assert builder.info.features["label"].names == list(syn.CLASS_NAMES)
    assert builder.info.supervised_keys == ("image", "label")
    # Preparing again is a no-op returning a usable builder.
    assert syn.prepare(str(tmp_path)).info.splits["test"].num_examples == syn.TEST_SIZE

    ds = tfds.load("synthetic_shapes", data_dir=str(tmp_path), split="test", download=False)
    expected = {}
    for i in range(syn.TEST_SIZE):
        image, label = syn.render_example("test", i)
        expected[hashlib.sha1(image.tobytes()).hexdigest()] = (image, label)
    seen = set()
    for ex in tfds.as_numpy(ds):
        image, label = ex["image"], int(ex["label"])
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        key = hashlib.sha1(image.tobytes()).hexdigest()
        assert key in expected  # PNG is lossless: decoded bytes equal the rendered ones
        np.testing.assert_array_equal(image, expected[key][0])
        assert label == expected[key][1]
        seen.add(key)
    assert len(seen) == syn.TEST_SIZE == len(expected)

    sup = builder.as_dataset(split="train", as_supervised=True).take(3)
    for image, label in tfds.as_numpy(sup):
        assert image.shape == (32, 32, 3) and 0 <= int(label) < 10


def _features(image: np.ndarray) -> np.ndarray:
    """Position/scale-normalised foreground mask (8x8) from a simple Otsu-like threshold."""
    gray = image.astype(np.float64).mean(axis=-1)
    lo, hi = np.percentile(gray, [5, 95])
    fg = gray > 0.5 * (lo + hi)
    if fg.mean() > 0.5:  # the shape is the minority side
        fg = ~fg
    rows, cols = np.nonzero(fg)
    crop = fg[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.float64)
    ri = (np.arange(8) + 0.5) * crop.shape[0] / 8
    ci = (np.arange(8) + 0.5) * crop.shape[1] / 8
    feat = crop[ri.astype(int)][:, ci.astype(int)].ravel()
    return np.append(feat, crop.mean())  # fill ratio separates e.g. disk from ring


def test_learnable_with_nearest_class_mean():
    def load(split, n):
        xs, ys = zip(*(syn.render_example(split, i) for i in range(n)), strict=True)
        return np.stack([_features(x) for x in xs]), np.array(ys)

    x_tr, y_tr = load("train", 1000)
    x_te, y_te = load("test", 300)
    means = np.stack([x_tr[y_tr == k].mean(axis=0) for k in range(10)])
    pred = np.argmin(((x_te[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    acc = (pred == y_te).mean()
    print(f"nearest-class-mean accuracy: {acc:.3f}")
    assert acc > 0.3, acc  # chance is 0.1
