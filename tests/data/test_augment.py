"""Host augmentation: timm's RandAugment ops and magnitudes, the op sampler, random erasing.

Every op runs both eagerly and inside a tf.data map, and is checked against its definition
(NumPy formulas, np.rot90, marker positions) and against PIL, which timm runs the ops with.
"""

import importlib.util
import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from conftest import ROOT
from convmixer_jax.data import augment, input_pipeline
from convmixer_jax.train.config import ConfigError, base_config, validate

FILL = (124, 116, 104)


def _both(fn, image):
    """fn(image) run eagerly and inside a tf.data map; both results as NumPy arrays."""
    eager = fn(tf.constant(image, tf.float32)).numpy()
    ds = tf.data.Dataset.from_tensors(tf.constant(image, tf.float32)).map(fn)
    return eager, next(iter(ds)).numpy()


def _check(fn, image, expected, atol=0.0):
    for out in _both(fn, image):
        np.testing.assert_allclose(out, expected, atol=atol)


def _random_image(shape=(24, 32, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.float32)


def _smooth_image(shape=(24, 32, 3), seed=0):
    """Random-walk rows: neighbouring pixels correlate, as in photos."""
    steps = np.random.default_rng(seed).integers(-12, 13, shape)
    return (np.cumsum(steps, axis=1) % 256).astype(np.float32)


def _gray(x):  # PIL's RGB -> L, fixed point
    return np.floor((x @ np.array([19595.0, 38470.0, 7471.0]) + 32768) / 65536)[..., None]


def _blend(degenerate, x, factor):  # PIL's Image.blend on 8-bit images
    return np.floor(np.clip(degenerate + factor * (x - degenerate), 0, 255))


def _smooth(x):  # PIL's SMOOTH filter: 3x3, centre 5/13, border pixels kept
    out = x.copy()
    h, w = x.shape[:2]
    acc = sum(x[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    out[1:-1, 1:-1] = np.floor(np.clip((acc + 4 * x[1:-1, 1:-1]) / 13, 0, 255) + 0.5)
    return out


# --- Config strings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("rand-m9-mstd0.5-inc1", augment.RandAugmentConfig(2, 9, 0.5, 10, True, 0.5)),
        ("rand-n2-m9-mstd0.5-inc1", augment.RandAugmentConfig(2, 9, 0.5, 10, True, 0.5)),
        ("rand-n3-m12-mmax20-p0.3-inc0", augment.RandAugmentConfig(3, 12, 0.0, 20, False, 0.3)),
        ("rand-n2-m4-inc1-p1.0", augment.RandAugmentConfig(2, 4, 0.0, 10, True, 1.0)),
        ("rand", augment.RandAugmentConfig(2, 10, 0.0, 10, False, 0.5)),
        ("rand-m7-mstd101", augment.RandAugmentConfig(2, 7, math.inf, 10, False, 0.5)),
    ],
)
def test_parse_randaugment(spec, expected):
    parsed = augment.parse_randaugment(spec)
    assert parsed == expected
    assert parsed.op_names == (augment.INCREASING_OPS if expected.increasing else augment.OPS)


@pytest.mark.parametrize(
    "spec",
    ["", "augmix-m5", "rand-m9-x3", "rand-m9.5", "rand-m9-m8", "rand-p1.5", "rand-mmax0",
     "rand--m9", "rand-m", "rand-w0", "rand-m9-mstd0.5.1"],
)  # fmt: skip
def test_parse_randaugment_rejects_bad_strings(spec):
    with pytest.raises(ValueError) as info:
        augment.parse_randaugment(spec)
    assert "\n" not in str(info.value) and repr(spec) in str(info.value)


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name, f"{ROOT}/configs/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_configs_carry_the_papers_augmentation():
    for name in ("convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20"):
        c = _load_config(name)
        assert (c.randaugment, c.random_erase_prob) == ("rand-m9-mstd0.5-inc1", 0.25)
        assert c.train_interpolation == "random"
        validate(c, 10)  # the paper's 10 devices
    cifar = _load_config("cifar10")
    assert augment.parse_randaugment(cifar.randaugment) == augment.RandAugmentConfig(
        2, 4, 0.0, 10, True, 1.0
    )
    assert cifar.random_erase_prob == 0.0
    assert base_config().randaugment == "" and base_config().random_erase_prob == 0.0
    for key, value in [
        ("randaugment", "rand-m9-q3"),
        ("random_erase_prob", 1.5),
        ("train_interpolation", "lanczos"),
    ]:
        c = base_config()
        c[key] = value
        with pytest.raises(ConfigError, match=key):
            validate(c, 8)


# --- Colour ops: magnitude -> argument, and the op's definition ------------------------------


@pytest.mark.parametrize("magnitude, bits", [(0, 4), (2.6, 3), (5, 2), (9, 1), (10, 0)])
def test_posterize_increasing_keeps_4_minus_int_4m_over_10_bits(magnitude, bits):
    x = _random_image()
    mask = (0xFF << (8 - bits)) & 0xFF
    expected = (x.astype(np.uint8) & mask).astype(np.float32)
    _check(lambda im: augment.apply_op("PosterizeIncreasing", im, magnitude), x, expected)
    # timm's default set: int(4 m / 10) bits.
    plain_mask = (0xFF << (8 - (4 - bits))) & 0xFF
    expected = x.astype(np.uint8) & plain_mask
    _check(lambda im: augment.apply_op("Posterize", im, magnitude), x, expected)


@pytest.mark.parametrize("magnitude", [0.0, 3.3, 9.0, 10.0])
def test_solarize_inverts_values_at_or_above_the_threshold(magnitude):
    x = _random_image()
    threshold = 256 - int(256 * magnitude / 10)
    expected = np.where(x >= threshold, 255 - x, x)
    _check(lambda im: augment.apply_op("SolarizeIncreasing", im, magnitude), x, expected)
    plain = int(256 * magnitude / 10)
    expected = np.where(x >= plain, 255 - x, x)
    _check(lambda im: augment.apply_op("Solarize", im, magnitude), x, expected)


def test_solarize_add_adds_110_m_over_10_below_128():
    x = _random_image()
    add = int(110 * 9 / 10)
    expected = np.where(x < 128, np.minimum(x + add, 255), x)
    _check(lambda im: augment.apply_op("SolarizeAdd", im, 9.0), x, expected)


def test_invert():
    x = _random_image()
    _check(lambda im: augment.apply_op("Invert", im, 5.0), x, 255 - x)


def test_auto_contrast_stretches_each_channel_to_0_255():
    x = 60 + np.floor(_random_image() / 4)  # values 60..123
    x[..., 2] = 77  # a flat channel stays as it is
    lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    expected = np.floor((x - lo) * 255 / np.maximum(hi - lo, 1))
    expected[..., 2] = 77
    for out in _both(lambda im: augment.apply_op("AutoContrast", im, 0.0), x):
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(out[..., :2].min(axis=(0, 1)), 0)
        np.testing.assert_array_equal(out[..., :2].max(axis=(0, 1)), 255)


def test_equalize_flattens_the_histogram():
    # A skewed image: values concentrated in the dark end.
    x = np.floor(255 * np.random.default_rng(1).beta(1.5, 6, (64, 64, 3))).astype(np.float32)
    for out in _both(lambda im: augment.apply_op("Equalize", im, 0.0), x):
        for c in range(3):
            cdf = np.cumsum(np.bincount(out[..., c].astype(int).ravel(), minlength=256))
            cdf = cdf / cdf[-1]
            occupied = np.unique(out[..., c]).astype(int)
            # At every occupied level the share of pixels at or below it is ~ level / 255.
            assert np.abs(cdf[occupied] - (occupied + 1) / 256).max() < 0.06
        # Order-preserving.
        assert np.all(np.diff(out[..., 0].ravel()[np.argsort(x[..., 0].ravel())]) >= 0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("op", ["Brightness", "Color", "Contrast", "Sharpness"])
def test_enhance_ops_follow_pils_blend(op, sign):
    x = _smooth_image()
    degenerate = {
        "Brightness": np.zeros_like(x),
        "Color": np.broadcast_to(_gray(x), x.shape),
        "Contrast": np.full_like(x, np.floor(_gray(x).mean() + 0.5)),
        "Sharpness": _smooth(x),
    }[op]
    factor = 1 + sign * 0.9 * 7 / 10  # increasing: 1 +- 0.9 m / 10
    expected = _blend(degenerate, x, factor)
    fn = lambda im: augment.apply_op(op + "Increasing", im, 7.0, sign)  # noqa: E731
    _check(fn, x, expected)
    # timm's default set: 0.1 + 1.8 m / 10, no sign.
    _check(lambda im: augment.apply_op(op, im, 2.0, sign), x, _blend(degenerate, x, 0.46), 1.0)
    assert float(augment.op_argument(op + "Increasing", 7.0, sign)) == pytest.approx(factor)


def test_colour_ops_match_pil():
    """The ops timm uses on PIL images, reproduced exactly (NumPy float rounding aside)."""
    x = _smooth_image((29, 41, 3), seed=3)
    pil = Image.fromarray(x.astype(np.uint8))
    cases = [
        ("AutoContrast", 0, ImageOps.autocontrast(pil)),
        ("Equalize", 0, ImageOps.equalize(pil)),
        ("PosterizeIncreasing", 5, ImageOps.posterize(pil, 2)),
        ("SolarizeIncreasing", 5, ImageOps.solarize(pil, 128)),
        ("ColorIncreasing", 5, ImageEnhance.Color(pil).enhance(1.45)),
        ("ContrastIncreasing", 5, ImageEnhance.Contrast(pil).enhance(1.45)),
        ("BrightnessIncreasing", 5, ImageEnhance.Brightness(pil).enhance(1.45)),
        ("SharpnessIncreasing", 5, ImageEnhance.Sharpness(pil).enhance(1.45)),
    ]
    for name, magnitude, expected in cases:
        out = augment.apply_op(name, tf.constant(x), magnitude).numpy()
        np.testing.assert_allclose(out, np.asarray(expected), atol=1, err_msg=name)
        assert np.mean(out == np.asarray(expected)) > 0.99, name


# --- Geometric ops ---------------------------------------------------------------------------


def _centroid(image, channel=0):
    weights = image[..., channel]
    ys, xs = np.mgrid[: weights.shape[0], : weights.shape[1]]
    return np.array([(weights * ys).sum(), (weights * xs).sum()]) / weights.sum()


def _marker(shape, y, x):
    image = np.zeros(shape, np.float32)
    image[y - 1 : y + 2, x - 1 : x + 2, 0] = 255
    return image


def test_rotate_by_90_degrees_is_rot90():
    x = _random_image((20, 20, 3))
    # magnitude 30 -> 30 * 30 / 10 = 90 degrees, counter-clockwise.
    _check(lambda im: augment.apply_op("Rotate", im, 30.0, 1.0, FILL), x, np.rot90(x))
    _check(lambda im: augment.apply_op("Rotate", im, 30.0, -1.0, FILL), x, np.rot90(x, -1))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rotate_moves_a_point_by_30_m_over_10_degrees(sign):
    h, w = 41, 51
    x = _marker((h, w, 3), 10, 40)
    degrees = sign * 30 * 9 / 10
    theta = math.radians(degrees)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    # Counter-clockwise on screen (y points down).
    dy, dx = 10 - cy, 40 - cx
    expected = [cy - math.sin(theta) * dx + math.cos(theta) * dy,
                cx + math.cos(theta) * dx + math.sin(theta) * dy]  # fmt: skip
    fill = (0, 50, 60)  # nothing in the marker's channel
    for out in _both(lambda im: augment.apply_op("Rotate", im, 9.0, sign, fill), x):
        np.testing.assert_allclose(_centroid(out), expected, atol=0.3)
        np.testing.assert_array_equal(out[0, 0], fill)  # an uncovered corner
        np.testing.assert_array_equal(out[h // 2, w // 2], 0)  # the centre stays put
    assert float(augment.op_argument("Rotate", 9.0, sign)) == pytest.approx(degrees)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_shear_moves_a_point_by_0_3_m_over_10(sign):
    x = _marker((40, 48, 3), 30, 24)
    factor = sign * 0.3 * 8 / 10
    # Output point (u, v) samples input (u + factor * v, v) (pixel centres at +0.5).
    expected_x = (24 + 0.5) - factor * (30 + 0.5) - 0.5
    fill = (0, 50, 60)
    for out in _both(lambda im: augment.apply_op("ShearX", im, 8.0, sign, fill), x):
        np.testing.assert_allclose(_centroid(out), [30, expected_x], atol=0.2)
        corner = (-1, -1) if sign > 0 else (-1, 0)  # uncovered by the shear
        np.testing.assert_array_equal(out[corner], fill)
    y = np.transpose(x, (1, 0, 2))
    for out in _both(lambda im: augment.apply_op("ShearY", im, 8.0, sign, fill), y):
        np.testing.assert_allclose(_centroid(out), [expected_x, 30], atol=0.2)


def test_translate_moves_content_by_0_45_m_over_10_of_the_size_and_fills():
    x = _random_image((20, 40, 3))
    fill = (1, 2, 3)
    shift = 18  # 0.45 * 40
    expected = np.empty_like(x)
    expected[:, : 40 - shift], expected[:, 40 - shift :] = x[:, shift:], fill
    _check(lambda im: augment.apply_op("TranslateXRel", im, 10.0, 1.0, fill), x, expected)
    shift = 9  # 0.45 * 20, downwards for the negative sign
    expected = np.empty_like(x)
    expected[shift:], expected[:shift] = x[:-shift], fill
    _check(lambda im: augment.apply_op("TranslateYRel", im, 10.0, -1.0, fill), x, expected)
    assert float(augment.op_argument("TranslateXRel", 5.0, -1.0)) == pytest.approx(-0.225)


def test_geometric_ops_match_pil():
    x = _smooth_image((29, 41, 3), seed=4)
    pil = Image.fromarray(x.astype(np.uint8))
    kw = {"resample": Image.BILINEAR, "fillcolor": FILL}
    shift_x, shift_y = (1, 0, 0.405 * 41, 0, 1, 0), (1, 0, 0, 0, 1, 0.405 * 29)
    cases = [
        ("Rotate", -1.0, pil.rotate(-27, **kw)),
        ("ShearX", 1.0, pil.transform(pil.size, Image.AFFINE, (1, 0.27, 0, 0, 1, 0), **kw)),
        ("ShearY", -1.0, pil.transform(pil.size, Image.AFFINE, (1, 0, 0, -0.27, 1, 0), **kw)),
        ("TranslateXRel", 1.0, pil.transform(pil.size, Image.AFFINE, shift_x, **kw)),
        ("TranslateYRel", 1.0, pil.transform(pil.size, Image.AFFINE, shift_y, **kw)),
    ]  # fmt: skip
    for name, sign, expected in cases:
        out = augment.apply_op(name, tf.constant(x), 9.0, sign, FILL).numpy()
        np.testing.assert_allclose(out, np.asarray(expected), atol=1, err_msg=name)
        assert np.mean(out == np.asarray(expected)) > 0.95, name


# --- The op sampler and the whole RandAugment ------------------------------------------------


def _draws(config, n_keys=4000):
    base = tf.constant([5, 6], tf.int64)
    ds = tf.data.Dataset.range(n_keys).map(
        lambda i: augment.sample_ops(tf.random.experimental.stateless_fold_in(base, i), config)
    )
    return next(iter(ds.batch(n_keys)))


def test_sampler_distribution():
    config = augment.parse_randaugment("rand-m9-mstd0.5-inc1")
    draws = _draws(config)
    choices = draws.choices.numpy().ravel()
    counts = np.bincount(choices, minlength=15)
    assert len(counts) == 15 and counts.sum() == 8000
    assert np.abs(counts / 8000 - 1 / 15).max() < 0.015  # uniform over the 15 ops
    # Two slots drawn independently (with replacement): same op twice ~ 1/15 of images.
    same = np.mean(draws.choices.numpy()[:, 0] == draws.choices.numpy()[:, 1])
    assert abs(same - 1 / 15) < 0.015
    assert abs(draws.applied.numpy().mean() - 0.5) < 0.02
    assert abs(np.mean(draws.signs.numpy() == 1.0) - 0.5) < 0.02
    assert set(np.unique(draws.signs.numpy())) == {-1.0, 1.0}
    magnitudes = draws.magnitudes.numpy()
    assert abs(magnitudes.mean() - 9.0) < 0.03 and abs(magnitudes.std() - 0.5) < 0.03
    assert magnitudes.max() <= 10.0 and np.mean(magnitudes == 10.0) > 0.01  # 2-sigma clipping


def test_magnitude_noise_is_clipped_to_0_mmax():
    wide = _draws(augment.RandAugmentConfig(magnitude=9, magnitude_std=4.0, magnitude_max=12))
    m = wide.magnitudes.numpy()
    assert m.min() == 0.0 and m.max() == 12.0
    assert abs(np.mean(m == 12.0) - 0.2266) < 0.025  # P(N(9, 4) > 12)
    assert abs(np.mean(m == 0.0) - 0.0122) < 0.008  # P(N(9, 4) < 0)
    uniform = _draws(augment.parse_randaugment("rand-m6-mstd200")).magnitudes.numpy()
    assert 0 <= uniform.min() < 0.1 and 5.9 < uniform.max() <= 6 and abs(uniform.mean() - 3) < 0.1
    fixed = _draws(augment.parse_randaugment("rand-m7-p1.0"), 100)
    np.testing.assert_array_equal(fixed.magnitudes.numpy(), 7.0)
    assert fixed.applied.numpy().all()


def test_rand_augment_applies_the_drawn_ops_in_order():
    config = augment.parse_randaugment("rand-n3-m9-mstd0.5-inc1")
    x = _smooth_image((32, 32, 3), seed=5)
    keys = tf.constant([[i, 11] for i in range(8)], tf.int64)
    in_graph = tf.data.Dataset.from_tensor_slices(keys).map(
        lambda key: augment.rand_augment(tf.constant(x), key, config, FILL)
    )
    seen = set()
    for key, graph_out in zip(keys, in_graph.as_numpy_iterator(), strict=True):
        draws = augment.sample_ops(key, config)
        expected = tf.constant(x)
        for c, applied, m, s in zip(*(t.numpy() for t in draws), strict=True):
            if applied:
                seen.add(config.op_names[c])
                expected = augment.apply_op(config.op_names[c], expected, m, s, FILL)
        eager = augment.rand_augment(tf.constant(x), key, config, FILL).numpy()
        np.testing.assert_array_equal(eager, expected.numpy())
        np.testing.assert_array_equal(graph_out, expected.numpy())
    assert len(seen) >= 5
    # Nothing applied with p0; same key, same output; different keys, different outputs.
    none = augment.parse_randaugment("rand-m9-p0")
    key = tf.constant([3, 4], tf.int64)
    np.testing.assert_array_equal(augment.rand_augment(tf.constant(x), key, none).numpy(), x)
    outs = [augment.rand_augment(tf.constant(x), k, config).numpy() for k in (key, key, key + 1)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


# --- Random erasing --------------------------------------------------------------------------


def _erased(image, prob, n, seed=99):
    """random_erase over keys [i, seed], i < n, in a tf.data map; the first 2 also eagerly."""
    keys = tf.constant([[i, seed] for i in range(n)], tf.int64)
    fn = lambda key: augment.random_erase(tf.constant(image), key, prob=prob)  # noqa: E731
    outs = np.stack(list(tf.data.Dataset.from_tensor_slices(keys).map(fn).as_numpy_iterator()))
    for key, out in zip(keys[:2], outs, strict=False):
        np.testing.assert_array_equal(fn(key).numpy(), out)
    return outs


def test_random_erasing_probability_and_box():
    x = np.full((40, 56, 3), 7.0, np.float32)
    erased = 0
    for out in _erased(x, 0.25, 400):
        changed = np.any(out != 7.0, axis=-1)
        if not changed.any():
            continue
        erased += 1
        rows, cols = np.nonzero(changed)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert changed.sum() == h * w  # one solid box, all channels
        assert np.all(out[changed] != 7.0) and np.all(out[~changed] == 7.0)
        assert h < 40 and w < 56
        area = h * w / (40 * 56)
        assert 0.015 < area < 0.36  # 0.02..1/3, with rounding of the sides
        assert 0.3 / 1.3 < h / w < 1.3 / 0.3
    assert abs(erased / 400 - 0.25) < 0.065


def test_random_erasing_fills_with_standard_normal_noise():
    x = np.full((64, 64, 3), 7.0, np.float32)
    outs = _erased(x, 1.0, 30)
    noise = outs[outs != 7.0]
    assert noise.size > 30 * 3 * 0.02 * 64 * 64
    assert abs(noise.mean()) < 0.03 and abs(noise.std() - 1) < 0.03
    assert not np.array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(_erased(x, 0.0, 2), [x, x])
    np.testing.assert_array_equal(_erased(x, 1.0, 2), outs[:2])  # deterministic


# --- The whole train preprocessing -----------------------------------------------------------


def _jpegs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(360, 390)), int(rng.integers(480, 520))
        yy, xx = np.mgrid[:h, :w]
        image = np.stack([(yy + xx * k) % 256 for k in (1, 2, 3)], axis=-1)
        buf = io.BytesIO()
        Image.fromarray(image.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _stream(config, jpegs):
    base = tf.constant([config.seed, 0], tf.int64)
    ds = tf.data.Dataset.from_tensor_slices(jpegs).enumerate()
    ds = ds.map(
        lambda i, e: input_pipeline.train_preprocess(
            e, tf.random.experimental.stateless_fold_in(base, i), config
        )
    )
    return next(iter(ds.batch(len(jpegs)))).numpy()


def test_train_preprocess_with_the_papers_augmentation():
    c = _load_config("convmixer_1536_20")
    jpegs = _jpegs(6)
    out = _stream(c, jpegs)
    assert out.shape == (6, 224, 224, 3) and out.dtype == np.float32
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, _stream(c, jpegs))  # deterministic
    c_plain = _load_config("convmixer_1536_20")
    c_plain.randaugment, c_plain.random_erase_prob = "", 0.0
    plain = _stream(c_plain, jpegs)
    # Same crops, flips and interpolations underneath; RandAugment or erasing changes some images.
    assert 0 < sum(not np.allclose(a, b, atol=0.05) for a, b in zip(out, plain, strict=True))
    assert not np.array_equal(out[0], out[1])


def test_random_train_interpolation_picks_bilinear_or_bicubic():
    c = base_config()
    c.image_size, c.horizontal_flip = 48, False
    jpegs = _jpegs(12, seed=1)
    outs = {}
    for method in ("bilinear", "bicubic", "random"):
        c.train_interpolation = method
        outs[method] = _stream(c, jpegs)
    picked = [
        "bilinear" if np.array_equal(r, a) else "bicubic" if np.array_equal(r, b) else None
        for r, a, b in zip(outs["random"], outs["bilinear"], outs["bicubic"], strict=True)
    ]
    assert None not in picked and len(set(picked)) == 2
