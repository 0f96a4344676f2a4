"""Activation then train-mode BatchNorm, one function with a hand-written backward pass.

Every ConvMixer layer ends in conv + bias -> act -> BatchNorm. Left to autodiff, XLA splits that
into many passes over the activations and recomputes the producer inside several of them. Here
only the layer input `y` is kept for the backward pass, which recomputes act(y + shift) and
needs two reductions:

    a = act(y + shift), x_hat = (a - mean) * rstd, out = x_hat * scale + bias [+ residual]
    d_bias = sum(g), d_scale = sum(g * x_hat)
    d_y = act'(y + shift) * scale * rstd * (g - d_bias / m - x_hat * d_scale / m)
    d_shift = sum(d_y), d_residual = g

Statistics are per group of images (the leading axis of `y`), accumulated in float32 whatever
`y`'s dtype; the bias add and the activation run in `y`'s dtype, so with bfloat16 the tensors XLA
keeps for the backward pass are bfloat16 too (docs/accelerators.md). `impl` 'native' runs the
forward and backward each as one call of the CPU kernels (two passes over the activations).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from convmixer_jax.ops.activation import activate, derivative
from convmixer_jax.ops.cpu import kernels


def _stat_axes(y: jax.Array) -> tuple[int, ...]:
    return tuple(range(1, y.ndim - 1))  # per group: images and pixels


def _forward(y, shift, scale, bias, residual, kind, eps, impl):
    if impl == "native":
        out, mean, var = kernels.act_norm_forward(y, shift, scale, bias, residual, kind, eps)
        return out, mean, var, lax.rsqrt(var + eps)
    a = activate(y + shift.astype(y.dtype), kind)
    axes = _stat_axes(y)
    mean = jnp.mean(a, axes, keepdims=True, dtype=jnp.float32)
    a = a.astype(jnp.float32)
    var = jnp.maximum(jnp.square(a).mean(axes, keepdims=True) - jnp.square(mean), 0.0)
    rstd = lax.rsqrt(var + eps)
    out = (a - mean) * (rstd * scale) + bias
    if residual is not None:
        out = out + residual
    return out.astype(y.dtype), mean, var, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def act_batch_norm(y, shift, scale, bias, residual, kind: str, eps: float, impl: str = "xla"):
    """(BatchNorm(act(y + shift)) [+ residual], group means, group variances) for `y` of shape
    (groups, ..., C), per-channel `shift`, `scale`, `bias`, `residual` None or of y's shape.

    Means and variances (float32, shape (groups, 1, ..., 1, C)) are the batch statistics used
    for normalising (variance biased, as PyTorch normalises); they carry no gradient. `impl` is
    'xla' or 'native'.
    """
    out, mean, var, _ = _forward(y, shift, scale, bias, residual, kind, eps, impl)
    return out, mean, var


def _fwd(y, shift, scale, bias, residual, kind, eps, impl):
    out, mean, var, rstd = _forward(y, shift, scale, bias, residual, kind, eps, impl)
    # Not the residual itself: whether there is one, and its dtype, for its gradient.
    marker = None if residual is None else jnp.zeros((0,), residual.dtype)
    return (out, mean, var), (y, shift, scale, mean, rstd, marker)


def _bwd(kind, eps, impl, res, cts):
    y, shift, scale, mean, rstd, marker = res
    g = cts[0].astype(jnp.float32)  # the statistics' cotangents are ignored (no gradient)
    d_residual = None if marker is None else g.astype(marker.dtype)
    if impl == "native":
        grads = kernels.act_norm_backward(y, g, shift, scale, mean, rstd, kind)
        return (*grads, d_residual)
    yb = y + shift.astype(y.dtype)
    axes = _stat_axes(y)
    m = math.prod(y.shape[1:-1])
    x_hat = (activate(yb, kind).astype(jnp.float32) - mean) * rstd
    d_bias = g.sum(axes, keepdims=True)
    d_scale = (g * x_hat).sum(axes, keepdims=True)
    d_a = (scale * rstd) * (g - d_bias / m - x_hat * (d_scale / m))
    d_y = d_a * derivative(yb, kind).astype(jnp.float32)
    reduce = tuple(range(y.ndim - 1))
    return (
        d_y.astype(y.dtype),
        d_y.sum(reduce).astype(shift.dtype),
        d_scale.sum(reduce).astype(scale.dtype),
        d_bias.sum(reduce).astype(scale.dtype),
        d_residual,
    )


act_batch_norm.defvjp(_fwd, _bwd)
