"""The operations written in jax.numpy/lax, left to XLA: the implementation on TPUs and GPUs and
the reference the others are tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype of a sum of products: float32 for half-precision inputs."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype in (jnp.bfloat16, jnp.float16) else dtype


def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's grouped convolution (feature_group_count = channels), 'SAME' padding."""
    acc = acc_dtype(x.dtype)
    out = lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
        preferred_element_type=acc if acc != x.dtype else None,
    )
    return out.astype(x.dtype)


def pointwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., C) @ w (C, D): XLA's dot, which remat's 'dots' policy can see."""
    return jnp.einsum("...c,cd->...d", x, w.astype(x.dtype))


def patch_conv(images: jax.Array, kernel: jax.Array, patch: int) -> jax.Array:
    """The strided p x p patch embedding (no padding: a remainder of the image is dropped)."""
    return lax.conv_general_dilated(
        images,
        kernel.astype(images.dtype),
        window_strides=(patch, patch),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
