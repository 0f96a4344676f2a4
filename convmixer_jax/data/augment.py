"""Host-side train augmentation with timm's semantics, in TensorFlow core ops.

RandAugment follows timm's `rand-...` config strings (the authors trained with
`rand-m9-mstd0.5-inc1`): per image, `num_ops` ops drawn uniformly with replacement, each applied
with probability `prob`, each with its own magnitude drawn from N(m, mstd) clipped to [0, mmax].
timm runs the ops on 8-bit PIL images, so every op here takes and returns float32 HxWx3 images
holding whole numbers in [0, 255], and each reproduces its PIL counterpart (PIL's rounding and
edge handling included). Random erasing follows timm's RandomErasing in 'pixel' mode and runs on
the normalised image.

All randomness is stateless, drawn from a [2] int64 key, so the augmented stream is a pure
function of the key; everything works eagerly and inside `tf.data` maps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import tensorflow as tf

from convmixer_jax.data.randaugment_spec import (  # noqa: F401 (re-exported)
    INCREASING_OPS,
    LEVEL_DENOM,
    OPS,
    RandAugmentConfig,
    parse_randaugment,
)

# timm's ImageNet fill colour: round(255 * IMAGENET_MEAN).
IMAGENET_FILL = (124, 116, 104)


def _select(condition: tf.Tensor, yes: tf.Tensor, no: tf.Tensor) -> tf.Tensor:
    """tf.where for whole-number images, as arithmetic: several times faster on CPU, and exact."""
    return no + tf.cast(condition, tf.float32) * (yes - no)


# --- Colour ops (PIL's ImageOps / ImageEnhance on 8-bit RGB) ---------------------------------


def invert(image: tf.Tensor) -> tf.Tensor:
    return 255.0 - image


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """Keeps the `bits` most significant bits of every value (0 bits: black)."""
    step = tf.pow(2.0, 8.0 - tf.clip_by_value(tf.cast(bits, tf.float32), 0.0, 8.0))
    return tf.floor(image / step) * step


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """Inverts every value >= threshold."""
    return _select(image >= tf.cast(threshold, tf.float32), 255.0 - image, image)


def solarize_add(image: tf.Tensor, add: tf.Tensor, threshold: float = 128.0) -> tf.Tensor:
    """Adds `add` (saturating at 255) to every value below threshold."""
    added = tf.minimum(image + tf.cast(add, tf.float32), 255.0)
    return _select(image < threshold, added, image)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """Stretches each channel linearly so its min becomes 0 and its max 255."""
    lo = tf.reduce_min(image, axis=[0, 1])
    hi = tf.reduce_max(image, axis=[0, 1])
    # A flat channel (hi == lo) maps to itself: (x - 0) * 255 / 255.
    varies = hi > lo
    lo, span = tf.where(varies, lo, 0.0), tf.where(varies, hi - lo, 255.0)
    return tf.floor((image - lo) * 255.0 / span)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """Per-channel histogram equalisation with PIL's lookup table."""
    index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])
    hist = tf.reshape(
        tf.math.bincount(tf.reshape(index, [-1]), minlength=768, maxlength=768), [3, 256]
    )
    # The count of each channel's highest occupied value is left out of PIL's step.
    occupied = tf.cast(hist > 0, tf.int32)
    highest = 255 - tf.argmax(occupied[:, ::-1], axis=1, output_type=tf.int32)
    top = tf.gather(hist, highest, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - top) // 255
    safe = tf.maximum(step, 1)[:, None]
    lut = tf.minimum((safe // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // safe, 255)
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None])
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), index), tf.float32)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's Image.blend: degenerate + factor * (image - degenerate), clipped and truncated."""
    out = degenerate + tf.cast(factor, tf.float32) * (image - degenerate)
    return tf.floor(tf.clip_by_value(out, 0.0, 255.0))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 luma, fixed point, rounded); HxWx1."""
    luma = image[..., :1] * 19595.0 + image[..., 1:2] * 38470.0 + image[..., 2:] * 7471.0
    return tf.floor((luma + 32768.0) / 65536.0)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with black: factor 0 is black, 1 the original."""
    return _blend(tf.zeros_like(image), image, factor)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with the grayscale image: factor 0 is gray, 1 the original."""
    return _blend(_grayscale(image), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with the mean gray level (rounded): factor 0 is flat gray, 1 the original."""
    mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
    return _blend(tf.fill(tf.shape(image), mean), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with PIL's SMOOTH filter (3x3, centre weight 5 of 13; border pixels unfiltered)."""
    # A separable 3x3 box sum plus 4x the centre (much faster than a depthwise conv on CPU).
    rows = image[:, :-2] + image[:, 1:-1] + image[:, 2:]
    box = rows[:-2] + rows[1:-1] + rows[2:]
    smooth = tf.floor((box + 4.0 * image[1:-1, 1:-1]) / 13.0 + 0.5)
    degenerate = image + tf.pad(smooth - image[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]])
    return _blend(degenerate, image, factor)


# --- Geometric ops (PIL's Image.transform(AFFINE, BILINEAR, fillcolor)) ----------------------


def affine(
    image: tf.Tensor, coeffs: Sequence[tf.Tensor | float], fill: tf.Tensor | Sequence[float]
) -> tf.Tensor:
    """PIL's affine transform: output point (x, y) samples input (ax + by + c, dx + ey + f).

    Coordinates are continuous with pixel centres at +0.5, as in PIL. Points that land inside
    the image are sampled bilinearly with edge clamping (truncated to whole numbers, like PIL);
    the others get `fill`.
    """
    a, b, c, d, e, f = (tf.cast(v, tf.float32) for v in coeffs)
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    # The same map between pixel indices (centres at integers), which is what TF samples with.
    transform = tf.stack([a, b, c + 0.5 * (a + b - 1.0), d, e, f + 0.5 * (d + e - 1.0), 0.0, 0.0])
    sampled = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=shape[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )[0]
    xs = tf.range(width)[None] + 0.5
    ys = tf.range(height)[:, None] + 0.5
    x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
    return _select(inside[..., None], tf.floor(sampled), tf.cast(fill, tf.float32))


def rotate(image: tf.Tensor, degrees: tf.Tensor, fill) -> tf.Tensor:
    """Rotates counter-clockwise by `degrees` about the image centre (PIL's Image.rotate)."""
    angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    # Rounded like PIL does (there to 15 places), so multiples of 90 degrees map pixels exactly.
    cos, sin = tf.round(tf.cos(angle) * 1e6) / 1e6, tf.round(tf.sin(angle) * 1e6) / 1e6
    shape = tf.cast(tf.shape(image), tf.float32)
    cx, cy = shape[1] / 2.0, shape[0] / 2.0
    coeffs = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    return affine(image, coeffs, fill)


def shear_x(image: tf.Tensor, factor: tf.Tensor, fill) -> tf.Tensor:
    return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image: tf.Tensor, factor: tf.Tensor, fill) -> tf.Tensor:
    return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x(image: tf.Tensor, pixels: tf.Tensor, fill) -> tf.Tensor:
    """Output column x shows input column x + pixels (positive `pixels` moves content left)."""
    return affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y(image: tf.Tensor, pixels: tf.Tensor, fill) -> tf.Tensor:
    return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


# --- timm's magnitude -> argument maps and op table ------------------------------------------


def _fraction(magnitude: tf.Tensor) -> tf.Tensor:
    return tf.cast(magnitude, tf.float32) / LEVEL_DENOM


def _enhance_level(m, sign):  # [0.1, 1.9], no sign
    return _fraction(m) * 1.8 + 0.1


def _enhance_increasing_level(m, sign):  # 1 +- 0.9 m/10, at least 0.1
    return tf.maximum(0.1, 1.0 + sign * _fraction(m) * 0.9)


def _posterize_level(m, sign):  # bits kept: 0..4, decreasing severity
    return tf.floor(_fraction(m) * 4.0)


def _solarize_level(m, sign):  # threshold 0..256, decreasing severity
    return tf.floor(_fraction(m) * 256.0)


# Each op: (level: (magnitude, sign) -> argument, or None; op(image, argument, fill)).
_Level = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
_OPS: dict[str, tuple[_Level | None, Callable]] = {
    "AutoContrast": (None, lambda x, _, fill: auto_contrast(x)),
    "Equalize": (None, lambda x, _, fill: equalize(x)),
    "Invert": (None, lambda x, _, fill: invert(x)),
    "Rotate": (lambda m, s: s * _fraction(m) * 30.0, rotate),
    "Posterize": (_posterize_level, lambda x, v, fill: posterize(x, v)),
    "PosterizeIncreasing": (
        lambda m, s: 4.0 - _posterize_level(m, s),
        lambda x, v, fill: posterize(x, v),
    ),
    "Solarize": (_solarize_level, lambda x, v, fill: solarize(x, v)),
    "SolarizeIncreasing": (
        lambda m, s: 256.0 - _solarize_level(m, s),
        lambda x, v, fill: solarize(x, v),
    ),
    "SolarizeAdd": (
        lambda m, s: tf.floor(_fraction(m) * 110.0),
        lambda x, v, fill: solarize_add(x, v),
    ),
    "Color": (_enhance_level, lambda x, v, fill: color(x, v)),
    "ColorIncreasing": (_enhance_increasing_level, lambda x, v, fill: color(x, v)),
    "Contrast": (_enhance_level, lambda x, v, fill: contrast(x, v)),
    "ContrastIncreasing": (_enhance_increasing_level, lambda x, v, fill: contrast(x, v)),
    "Brightness": (_enhance_level, lambda x, v, fill: brightness(x, v)),
    "BrightnessIncreasing": (_enhance_increasing_level, lambda x, v, fill: brightness(x, v)),
    "Sharpness": (_enhance_level, lambda x, v, fill: sharpness(x, v)),
    "SharpnessIncreasing": (_enhance_increasing_level, lambda x, v, fill: sharpness(x, v)),
    "ShearX": (lambda m, s: s * _fraction(m) * 0.3, shear_x),
    "ShearY": (lambda m, s: s * _fraction(m) * 0.3, shear_y),
    # A fraction of the image size (timm's translate_pct 0.45).
    "TranslateXRel": (
        lambda m, s: s * _fraction(m) * 0.45,
        lambda x, v, fill: translate_x(x, v * tf.cast(tf.shape(x)[1], tf.float32), fill),
    ),
    "TranslateYRel": (
        lambda m, s: s * _fraction(m) * 0.45,
        lambda x, v, fill: translate_y(x, v * tf.cast(tf.shape(x)[0], tf.float32), fill),
    ),
}


def op_argument(name: str, magnitude, sign=1.0) -> tf.Tensor | None:
    """timm's argument for op `name` at `magnitude` (0..10 scale); `sign` (+-1) for signed ops.

    Degrees for Rotate, shear factor, fraction of the image size for translations, bits kept
    for Posterize*, threshold for Solarize*, amount for SolarizeAdd, blend factor for enhance
    ops; None for ops without an argument.
    """
    level, _ = _OPS[name]
    return None if level is None else level(magnitude, tf.cast(sign, tf.float32))


@tf.autograph.experimental.do_not_convert
def apply_op(
    name: str, image: tf.Tensor, magnitude, sign=1.0, fill: Sequence[float] = IMAGENET_FILL
) -> tf.Tensor:
    """Applies timm op `name` at `magnitude` (not clipped here) to a 0..255 float32 image."""
    _, op = _OPS[name]
    return op(image, op_argument(name, magnitude, sign), tf.constant(fill, tf.float32))


class OpDraws(NamedTuple):
    """One image's RandAugment draws, one entry per op slot."""

    choices: tf.Tensor  # [n] int32: indices into config.op_names, uniform with replacement
    applied: tf.Tensor  # [n] bool: with probability config.prob
    magnitudes: tf.Tensor  # [n] float32: noisy magnitudes in [0, mmax]
    signs: tf.Tensor  # [n] float32: +1 or -1 with probability 0.5 each


def _magnitudes(key: tf.Tensor, config: RandAugmentConfig) -> tf.Tensor:
    m, n = float(config.magnitude), config.num_ops
    if math.isinf(config.magnitude_std):
        magnitudes = tf.random.stateless_uniform([n], key, 0.0, m)
    else:
        magnitudes = m + config.magnitude_std * tf.random.stateless_normal([n], key)
    return tf.clip_by_value(magnitudes, 0.0, float(config.magnitude_max))


def sample_ops(key: tf.Tensor, config: RandAugmentConfig) -> OpDraws:
    """timm's draws for one image's `num_ops` op slots.

    Magnitudes are m + N(0, mstd) (uniform in [0, m] if mstd is inf), clipped to [0, mmax].
    """
    n = config.num_ops
    choice_key, apply_key, magnitude_key, sign_key = tf.unstack(
        tf.random.experimental.stateless_split(key, 4)
    )
    return OpDraws(
        choices=tf.random.stateless_uniform([n], choice_key, 0, len(config.op_names), tf.int32),
        applied=tf.random.stateless_uniform([n], apply_key) < config.prob,
        magnitudes=_magnitudes(magnitude_key, config),
        signs=tf.where(tf.random.stateless_uniform([n], sign_key) < 0.5, 1.0, -1.0),
    )


@tf.autograph.experimental.do_not_convert  # plain graph ops: tracing needs no AutoGraph
def rand_augment(
    image: tf.Tensor,
    key: tf.Tensor,
    config: RandAugmentConfig,
    fill: Sequence[float] = IMAGENET_FILL,
) -> tf.Tensor:
    """timm's RandAugment on a float32 HxWx3 image of whole numbers in [0, 255].

    Applies the ops `sample_ops` draws, in order; `fill` colours the area geometric ops uncover.
    """
    names = config.op_names
    draws = sample_ops(key, config)
    for i in range(config.num_ops):
        magnitude, sign = draws.magnitudes[i], draws.signs[i]
        branches = [
            functools.partial(apply_op, name, image, magnitude, sign, fill) for name in names
        ]
        branches.append(functools.partial(tf.identity, image))  # the op is skipped
        index = tf.where(draws.applied[i], draws.choices[i], len(names))
        image = tf.ensure_shape(tf.switch_case(index, branches), image.shape)
    return image


@tf.autograph.experimental.do_not_convert
def random_erase(
    image: tf.Tensor,
    key: tf.Tensor,
    *,
    prob: float,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    attempts: int = 10,
) -> tf.Tensor:
    """timm's RandomErasing, 'pixel' mode, one box, on a normalised HxWxC image.

    With probability `prob`: up to `attempts` tries of a box with area fraction
    U(min_area, max_area) and log-uniform aspect (h/w) in (min_aspect, 1/min_aspect); the first
    that fits strictly inside the image is placed uniformly and filled with N(0, 1) noise.
    """
    apply_key, area_key, aspect_key, place_key, noise_key = tf.unstack(
        tf.random.experimental.stateless_split(key, 5)
    )
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    area = tf.cast(height * width, tf.float32)
    targets = tf.random.stateless_uniform([attempts], area_key, min_area, max_area) * area
    log_aspect = math.log(min_aspect)
    aspects = tf.exp(tf.random.stateless_uniform([attempts], aspect_key, log_aspect, -log_aspect))
    box_h = tf.cast(tf.round(tf.sqrt(targets * aspects)), tf.int32)
    box_w = tf.cast(tf.round(tf.sqrt(targets / aspects)), tf.int32)
    fits = (box_h < height) & (box_w < width)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    box_h, box_w = box_h[first], box_w[first]
    erase = tf.reduce_any(fits) & (tf.random.stateless_uniform([], apply_key) < prob)

    def erased():
        u = tf.random.stateless_uniform([2], place_key)
        top = tf.cast(u[0] * tf.cast(height - box_h + 1, tf.float32), tf.int32)
        left = tf.cast(u[1] * tf.cast(width - box_w + 1, tf.float32), tf.int32)
        # Noise for the box only, padded into place (normals are costly to draw).
        box = tf.stack([box_h, box_w, shape[2]])
        noise = tf.random.stateless_normal(box, noise_key, dtype=image.dtype)
        padding = [[top, height - top - box_h], [left, width - left - box_w], [0, 0]]
        inside = tf.pad(tf.ones_like(noise), padding)
        return image * (1.0 - inside) + tf.pad(noise, padding)

    return tf.cond(erase, erased, lambda: image)
