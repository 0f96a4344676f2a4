"""Activation then train-mode BatchNorm, one function with a hand-written backward pass.

Every ConvMixer layer ends in act -> BatchNorm. Left to autodiff, XLA's CPU backend splits the
pair into many passes over the activations and recomputes the producer (the depthwise tap sum,
the exact GELU's erf) inside several of them. With this version the ConvMixer-256/8 train step
(batch 128, float32) on a 2-core CPU went from 22 to 36 img/s
(`python -m convmixer_jax.benchmark model --config configs/cifar10.py --batch_size 128`).
Only the layer input `y` is kept for the backward pass, which recomputes act(y) once and needs
two reductions:

    a = act(y), x_hat = (a - mean) * rstd, out = x_hat * scale + bias
    d_bias = sum(g), d_scale = sum(g * x_hat)
    d_y = act'(y) * scale * rstd * (g - d_bias / m - x_hat * d_scale / m)

Statistics are per group of images (the leading axis of `y`), float32 whatever `y`'s dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

_SQRT_HALF = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
ACTIVATIONS = ("gelu", "relu")  # the models' choices; "identity" is plain BatchNorm


def activate(y: jax.Array, kind: str) -> jax.Array:
    """The activation `kind`: 'gelu' (exact, erf, as PyTorch's default), 'relu' or 'identity'."""
    if kind == "gelu":
        return y * (0.5 + 0.5 * lax.erf(y * _SQRT_HALF))
    if kind == "relu":
        return jnp.maximum(y, 0)
    if kind == "identity":
        return y
    raise ValueError(f"unknown activation {kind!r}; choose one of {ACTIVATIONS}")


def _act_grad(y: jax.Array, kind: str) -> jax.Array:
    if kind == "gelu":
        return 0.5 + 0.5 * lax.erf(y * _SQRT_HALF) + y * jnp.exp(-0.5 * y * y) * _INV_SQRT_2PI
    if kind == "relu":
        return (y > 0).astype(y.dtype)
    return jnp.ones_like(y)


def _stat_axes(y: jax.Array) -> tuple[int, ...]:
    return tuple(range(1, y.ndim - 1))  # per group: images and pixels


def _forward(y, scale, bias, kind, eps):
    a = activate(y.astype(jnp.float32), kind)
    axes = _stat_axes(y)
    mean = a.mean(axes, keepdims=True)
    var = jnp.maximum(jnp.square(a).mean(axes, keepdims=True) - jnp.square(mean), 0.0)
    rstd = lax.rsqrt(var + eps)
    out = ((a - mean) * (rstd * scale) + bias).astype(y.dtype)
    return out, mean, var, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def act_batch_norm(y: jax.Array, scale: jax.Array, bias: jax.Array, kind: str, eps: float):
    """(BatchNorm(act(y)), group means, group variances) for `y` of shape (groups, ..., C).

    Means and variances (float32, shape (groups, 1, ..., 1, C)) are the batch statistics used
    for normalising (variance biased, as PyTorch normalises); they carry no gradient.
    """
    out, mean, var, _ = _forward(y, scale, bias, kind, eps)
    return out, mean, var


def _fwd(y, scale, bias, kind, eps):
    out, mean, var, rstd = _forward(y, scale, bias, kind, eps)
    return (out, mean, var), (y, scale, mean, rstd)


def _bwd(kind, eps, res, cts):
    y, scale, mean, rstd = res
    g = cts[0].astype(jnp.float32)  # the statistics' cotangents are ignored (no gradient)
    yf = y.astype(jnp.float32)
    axes = _stat_axes(y)
    m = math.prod(y.shape[1:-1])
    x_hat = (activate(yf, kind) - mean) * rstd
    d_bias = g.sum(axes, keepdims=True)
    d_scale = (g * x_hat).sum(axes, keepdims=True)
    d_a = (scale * rstd) * (g - d_bias / m - x_hat * (d_scale / m))
    d_y = (d_a * _act_grad(yf, kind)).astype(y.dtype)
    reduce = tuple(range(y.ndim - 1))
    return d_y, d_scale.sum(reduce).astype(scale.dtype), d_bias.sum(reduce).astype(scale.dtype)


act_batch_norm.defvjp(_fwd, _bwd)
