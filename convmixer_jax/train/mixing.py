"""Mixup and CutMix on the accelerator, with timm's semantics, one draw per group of images.

timm's `Mixup` (mode 'batch') draws one lambda per batch, from Beta(alpha, alpha), and with
probability `switch_prob` uses CutMix instead of Mixup; it pairs image i with image B-1-i (the
batch flipped), corrects the CutMix lambda to the pasted box's clipped area and mixes label-
smoothed one-hot targets with the same lambda. The authors ran it on each GPU's batch of 64, so
here the global batch is split into groups of `group_size` consecutive images, each mixed on its
own as one such batch. Everything is plain jnp, so it runs under jit on a sharded batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections


class MixParams(NamedTuple):
    """One draw per group: lambda before the CutMix correction, CutMix or Mixup, box centre."""

    lam: jax.Array  # (G,) float32
    use_cutmix: jax.Array  # (G,) bool
    center_y: jax.Array  # (G,) int32, uniform in [0, height)
    center_x: jax.Array  # (G,) int32, uniform in [0, width)


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """The static settings of `mix_batch` that come from the config."""

    num_classes: int
    mixup_alpha: float
    cutmix_alpha: float
    switch_prob: float
    group_size: int


def from_config(config: ml_collections.ConfigDict, num_classes: int) -> MixConfig | None:
    """The config's mixing settings, or None when both alphas are 0 (no mixing)."""
    if config.mixup_alpha <= 0 and config.cutmix_alpha <= 0:
        return None
    return MixConfig(
        num_classes=num_classes,
        mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha,
        switch_prob=config.mixup_switch_prob,
        group_size=config.mixup_group_size,
    )


def num_groups(batch: int, group_size: int) -> int:
    """How many groups `batch` splits into; group_size 0 is the whole batch."""
    size = group_size or batch
    if batch % size:
        raise ValueError(f"group size {size} does not divide the batch of {batch}")
    return batch // size


def sample_params(
    key: jax.Array,
    groups: int,
    height: int,
    width: int,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float,
) -> MixParams:
    """timm's per-batch draw, once per group: CutMix with prob switch_prob when both alphas > 0."""
    k_switch, k_lam, k_y, k_x = jax.random.split(key, 4)
    shape = (groups,)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch, shape) < switch_prob
    else:
        use_cutmix = jnp.full(shape, cutmix_alpha > 0)
    if mixup_alpha > 0 or cutmix_alpha > 0:  # the chosen mode's alpha is then > 0
        alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
        lam = jax.random.beta(k_lam, alpha, alpha, shape, jnp.float32)
    else:
        lam = jnp.ones(shape, jnp.float32)
    return MixParams(
        lam=lam,
        use_cutmix=use_cutmix,
        center_y=jax.random.randint(k_y, shape, 0, height),
        center_x=jax.random.randint(k_x, shape, 0, width),
    )


def cutmix_box(
    lam: jax.Array, center_y: jax.Array, center_x: jax.Array, height: int, width: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """timm's rand_bbox: sides int(size * sqrt(1 - lam)), centred, clipped; (y0, y1, x0, x1)."""
    ratio = jnp.sqrt(1.0 - lam)
    half_h = jnp.floor(height * ratio).astype(jnp.int32) // 2
    half_w = jnp.floor(width * ratio).astype(jnp.int32) // 2
    return (
        jnp.clip(center_y - half_h, 0, height),
        jnp.clip(center_y + half_h, 0, height),
        jnp.clip(center_x - half_w, 0, width),
        jnp.clip(center_x + half_w, 0, width),
    )


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """timm's smoothed one-hot: off value smoothing / C, on value 1 - smoothing + smoothing / C."""
    off = smoothing / num_classes
    return jnp.where(
        jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), 1.0 - smoothing + off, off
    )


def apply_mix(
    params: MixParams,
    images: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    label_smoothing: float,
    group_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Mixes NHWC `images` per group with the drawn `params`; returns (images, soft targets)."""
    batch, height, width = images.shape[:3]
    groups = num_groups(batch, group_size)
    x = images.reshape(groups, batch // groups, *images.shape[1:])
    partner = x[:, ::-1]  # i <-> B-1-i within each group
    y0, y1, x0, x1 = cutmix_box(params.lam, params.center_y, params.center_x, height, width)
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    in_box = (
        (rows >= y0[:, None, None])
        & (rows < y1[:, None, None])
        & (cols >= x0[:, None, None])
        & (cols < x1[:, None, None])
    )
    area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
    lam = jnp.where(params.use_cutmix, 1.0 - area / (height * width), params.lam)
    cutmix = params.use_cutmix[:, None, None, None, None]
    paste = cutmix & in_box[:, None, :, :, None]
    weight = lam[:, None, None, None, None]
    blend = (x * weight + partner * (1.0 - weight)).astype(images.dtype)
    mixed = jnp.where(paste, partner, jnp.where(cutmix, x, blend))

    onehot = smooth_one_hot(labels, num_classes, label_smoothing)
    onehot = onehot.reshape(groups, batch // groups, num_classes)
    targets = lam[:, None, None] * onehot + (1.0 - lam[:, None, None]) * onehot[:, ::-1]
    return mixed.reshape(images.shape), targets.reshape(batch, num_classes)


def mix_batch(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float,
    label_smoothing: float,
    group_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Mixup/CutMix of NHWC `images`, one draw from `key` per group of `group_size` images.

    Returns the mixed images and soft targets (B, num_classes) with label smoothing folded in;
    group_size 0 mixes the whole batch as one group. With both alphas 0 the images are unchanged.
    """
    batch, height, width = images.shape[:3]
    params = sample_params(
        key,
        num_groups(batch, group_size),
        height,
        width,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        switch_prob=switch_prob,
    )
    return apply_mix(
        params,
        images,
        labels,
        num_classes=num_classes,
        label_smoothing=label_smoothing,
        group_size=group_size,
    )
