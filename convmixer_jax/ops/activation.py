"""The activations ConvMixer uses, and their derivatives."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

ACTIVATIONS = ("gelu", "relu")  # the models' choices; "identity" is plain BatchNorm
_SQRT_HALF = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def activate(y: jax.Array, kind: str) -> jax.Array:
    """The activation `kind`: 'gelu' (exact, erf, as PyTorch's default), 'relu' or 'identity'."""
    if kind == "gelu":
        return y * (0.5 + 0.5 * lax.erf(y * _SQRT_HALF))
    if kind == "relu":
        return jnp.maximum(y, 0)
    if kind == "identity":
        return y
    raise ValueError(f"unknown activation {kind!r}; choose one of {ACTIVATIONS}")


def derivative(y: jax.Array, kind: str) -> jax.Array:
    """d activate(y, kind) / dy."""
    if kind == "gelu":
        return 0.5 + 0.5 * lax.erf(y * _SQRT_HALF) + y * jnp.exp(-0.5 * y * y) * _INV_SQRT_2PI
    if kind == "relu":
        return (y > 0).astype(y.dtype)
    return jnp.ones_like(y)
