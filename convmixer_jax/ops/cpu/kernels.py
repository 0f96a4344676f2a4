"""ConvMixer's operations on the hand-written CPU kernels of `csrc/` (XLA FFI custom calls).

Each works on float32 (other dtypes are cast around it) and has its backward pass on the kernels
too, through `jax.custom_vjp`. A custom call runs on one device's whole operand (XLA's SPMD
partitioner does not split it), so the policy uses these on a single CPU device only.

The eval-mode layers (`depthwise_layer`, `pointwise_layer`) apply bias, activation, the folded
BatchNorm and the residual to each output tile while it is still in registers, where otherwise
XLA makes two more passes over the activations per block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from convmixer_jax.ops.activation import activate
from convmixer_jax.ops.cpu import native
from convmixer_jax.ops.shift import same_pads


def _depthwise_forward(x: jax.Array, w: jax.Array, pad_lo: int) -> jax.Array:
    return native.call(native.FORWARD, x.shape, x, w, pad_lo=np.int64(pad_lo))


@jax.custom_vjp
def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise conv of NHWC `x` with a (k, k, 1, C) kernel, 'SAME' padding."""
    k = kernel.shape[0]
    w = kernel[:, :, 0, :].astype(x.dtype)
    return _depthwise_forward(x, w, same_pads(k)[0]).astype(x.dtype)


def _depthwise_fwd(x, kernel):
    return depthwise_conv(x, kernel), (x, kernel)


def _depthwise_bwd(res, g):
    x, kernel = res
    k = kernel.shape[0]
    lo, hi = same_pads(k)
    g = g.astype(x.dtype)
    # The input gradient is the forward kernel on g with the flipped kernel, mirrored padding.
    dx = _depthwise_forward(g, kernel[::-1, ::-1, 0, :].astype(x.dtype), hi).astype(x.dtype)
    dw = native.call(native.WEIGHT_GRAD, (k, k, x.shape[-1]), x, g, pad_lo=np.int64(lo))
    return dx, dw[:, :, None, :].astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


def _product(a: jax.Array, b: jax.Array, *, transpose_a=False, transpose_b=False):
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    return native.call(
        native.MATMUL, (m, n), a, b, transpose_a=transpose_a, transpose_b=transpose_b
    )


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return _product(x, w)


def _matmul_fwd(x, w):
    return _product(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    dx = _product(g, w, transpose_b=True)
    dw = _product(x, g, transpose_a=True)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def pointwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., C) @ w (C, D) -> (..., D) in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    out = _matmul(flat, w.astype(x.dtype))
    return out.reshape(*x.shape[:-1], w.shape[-1]).astype(x.dtype)


def patches(images: jax.Array, patch: int) -> jax.Array:
    """The non-overlapping p x p patches of NHWC images, each flattened in a conv kernel's
    (row, column, channel) order; a remainder of the image is dropped."""
    n, h, w, c = images.shape
    h, w = h // patch * patch, w // patch * patch
    x = images[:, :h, :w].reshape(n, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // patch, w // patch, patch * patch * c)


def patch_conv(images: jax.Array, kernel: jax.Array, patch: int) -> jax.Array:
    """The strided patch embedding as the product of the patches with the flattened kernel
    (XLA's strided convolution and its weight gradient are slow paths on CPU)."""
    return pointwise_conv(patches(images, patch), kernel.reshape(-1, kernel.shape[-1]))


# --- Activation + train-mode BatchNorm (the forward and backward of `ops.actnorm`) ------------


def _rows(y: jax.Array) -> jax.Array:
    return y.reshape(y.shape[0], -1, y.shape[-1]).astype(jnp.float32)


def _stat_shape(y: jax.Array) -> tuple[int, ...]:
    return (y.shape[0], *[1] * (y.ndim - 2), y.shape[-1])


def act_norm_forward(y, shift, scale, bias, residual, kind: str, eps: float):
    """(out, mean, var) of `ops.actnorm.act_batch_norm` in two passes over the activations."""
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
    return out.reshape(y.shape).astype(y.dtype), mean, var


def act_norm_backward(y, g, shift, scale, mean, rstd, kind: str):
    """(d_y, d_shift, d_scale, d_bias) of `ops.actnorm.act_batch_norm`, in two passes."""
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
    return d_y.reshape(y.shape).astype(y.dtype), d_shift, d_scale, d_bias


# --- Eval-mode layers: one kernel call each --------------------------------------------------


def _differentiable_as(reference):
    """A custom_vjp of the fused function whose backward pass is `reference`'s."""

    def wrap(fused):
        f = jax.custom_vjp(fused, nondiff_argnums=(5,))

        def fwd(*args):
            return fused(*args), args[:5]

        def bwd(activation, operands, g):
            return jax.vjp(functools.partial(reference, activation=activation), *operands)[1](g)

        f.defvjp(fwd, bwd)
        return f

    return wrap


def _depthwise_reference(x, kernel, bias, scale, shift, activation):
    return x + activate(depthwise_conv(x, kernel) + bias, activation) * scale + shift


def _pointwise_reference(x, w, bias, scale, shift, activation):
    return activate(pointwise_conv(x, w) + bias, activation) * scale + shift


@_differentiable_as(_depthwise_reference)
def depthwise_layer(x, kernel, bias, scale, shift, activation):
    """x + act(depthwise(x, kernel) + bias) * scale + shift: NHWC float32 x, (k, k, 1, C) kernel."""
    return native.call(
        native.DEPTHWISE_LAYER,
        x.shape,
        x,
        kernel[:, :, 0, :],
        bias,
        scale,
        shift,
        pad_lo=np.int64(same_pads(kernel.shape[0])[0]),
        act=native.act_code(activation),
    )


@_differentiable_as(_pointwise_reference)
def pointwise_layer(x, w, bias, scale, shift, activation):
    """act(x @ w + bias) * scale + shift over the last axis of float32 x; w (C, D)."""
    flat = x.reshape(-1, x.shape[-1])
    out = native.call(
        native.POINTWISE_LAYER,
        (flat.shape[0], w.shape[1]),
        flat,
        w,
        bias,
        scale,
        shift,
        act=native.act_code(activation),
    )
    return out.reshape(*x.shape[:-1], w.shape[1])
