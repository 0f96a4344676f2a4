"""Activation then train-mode BatchNorm, one function with a hand-written backward pass.

Every ConvMixer layer ends in conv + bias -> act -> BatchNorm (and the depthwise layer in a
residual sum). Left to autodiff, XLA's CPU backend splits that into many passes over the
activations and recomputes the producer (the depthwise tap sum, the exact GELU's erf) inside
several of them. With this version the ConvMixer-256/8 train step (batch 128, float32) on a
2-core CPU went from 22 to 36 img/s
(`python -m convmixer_jax.benchmark model --config configs/cifar10.py --batch_size 128`).
Only the layer input `y` is kept for the backward pass, which recomputes act(y + shift) once and
needs two reductions:

    a = act(y + shift), x_hat = (a - mean) * rstd, out = x_hat * scale + bias [+ residual]
    d_bias = sum(g), d_scale = sum(g * x_hat)
    d_y = act'(y + shift) * scale * rstd * (g - d_bias / m - x_hat * d_scale / m)
    d_shift = sum(d_y), d_residual = g

Implementations (`impl=`): 'xla' writes that out in jax.numpy; 'native' runs the forward and the
backward each as one call of the CPU kernels of `csrc/actnorm_cpu.cc` (two passes over the
activations each, float32; sums in float per block of rows, then in double). `resolve_impl(
'auto', dtype)` picks 'native' for float32 where the pointwise matrix product does
(`pointwise.resolve_impl`). In a profile of ConvMixer-256/8's train step (batch 128, float32,
2-core AMD EPYC VM, `jax.profiler.trace` with `XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`)
XLA's passes for these layers took ~1.0 s of 2.1 s of op time, the kernels 0.53 s.

Statistics are per group of images (the leading axis of `y`), accumulated in float32 whatever
`y`'s dtype; the bias add and the activation run in `y`'s dtype, so with bfloat16 the tensors XLA
keeps for the backward pass are bfloat16 too (half the bytes: docs/accelerators.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convmixer_jax import native, pointwise

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


def resolve_impl(impl: str, dtype) -> str:
    """'native' or 'xla' for `impl` ('auto', 'native' or 'xla') and inputs of `dtype`."""
    if impl not in ("auto", "native", "xla"):
        raise ValueError(f"unknown act_batch_norm impl {impl!r}; choose auto, native or xla")
    if impl == "auto":
        return pointwise.resolve_impl("auto", dtype)
    if impl == "native":
        native.check_backend("act_batch_norm")
    return impl


def _rows(y: jax.Array) -> jax.Array:
    return y.reshape(y.shape[0], -1, y.shape[-1]).astype(jnp.float32)


def _stat_shape(y: jax.Array) -> tuple[int, ...]:
    return (y.shape[0], *[1] * (y.ndim - 2), y.shape[-1])


def _forward(y, shift, scale, bias, residual, kind, eps, impl):
    if impl == "native":
        empty = jnp.zeros((0,), jnp.float32)
        out, stats = native.call(
            native.ACTNORM_FORWARD,
            [(y.shape[0], math.prod(y.shape[1:-1]), y.shape[-1]), (y.shape[0], 2, y.shape[-1])],
            _rows(y),
            shift,
            scale,
            bias,
            empty if residual is None else _rows(residual),
            act=native.act_code(kind),
            eps=np.float32(eps),
        )
        mean, var = (stats[:, i].reshape(_stat_shape(y)) for i in (0, 1))
        return out.reshape(y.shape).astype(y.dtype), mean, var, lax.rsqrt(var + eps)
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
    'xla' or 'native' (see `resolve_impl`).
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
        stats = jnp.stack([mean.reshape(y.shape[0], -1), rstd.reshape(y.shape[0], -1)], 1)
        d_y, sums = native.call(
            native.ACTNORM_BACKWARD,
            [(y.shape[0], math.prod(y.shape[1:-1]), y.shape[-1]), (y.shape[0], 3, y.shape[-1])],
            _rows(y),
            _rows(g),
            shift,
            scale,
            stats,
            act=native.act_code(kind),
        )
        d_shift, d_scale, d_bias = (sums[:, i].sum(0).astype(scale.dtype) for i in (0, 1, 2))
        return d_y.reshape(y.shape).astype(y.dtype), d_shift, d_scale, d_bias, d_residual
    yb = y + shift.astype(y.dtype)
    axes = _stat_axes(y)
    m = math.prod(y.shape[1:-1])
    x_hat = (activate(yb, kind).astype(jnp.float32) - mean) * rstd
    d_bias = g.sum(axes, keepdims=True)
    d_scale = (g * x_hat).sum(axes, keepdims=True)
    d_a = (scale * rstd) * (g - d_bias / m - x_hat * (d_scale / m))
    d_y = d_a * _act_grad(yb, kind).astype(jnp.float32)
    reduce = tuple(range(y.ndim - 1))
    return (
        d_y.astype(y.dtype),
        d_y.sum(reduce).astype(shift.dtype),
        d_scale.sum(reduce).astype(scale.dtype),
        d_bias.sum(reduce).astype(scale.dtype),
        d_residual,
    )


act_batch_norm.defvjp(_fwd, _bwd)
