"""ConvMixer's operations, each behind one function the model calls.

`impl` names an implementation: 'xla' (`xla.py`, what TPUs and GPUs run), 'shift' (`shift.py`,
the depthwise conv as shifted multiply-adds) or 'native' (`cpu/`, hand-written CPU kernels).
`policy.resolve` is the one place that picks them; kernels are HWIO, as in flax's Conv.
"""

from __future__ import annotations

import jax

from convmixer_jax.ops import shift, xla
from convmixer_jax.ops.activation import ACTIVATIONS, activate
from convmixer_jax.ops.actnorm import act_batch_norm
from convmixer_jax.ops.cpu import kernels
from convmixer_jax.ops.policy import Impls, resolve

__all__ = [
    "ACTIVATIONS",
    "Impls",
    "act_batch_norm",
    "activate",
    "depthwise_conv",
    "depthwise_layer",
    "fold_batch_norm",
    "patch_conv",
    "patch_layer",
    "pointwise_conv",
    "pointwise_layer",
    "resolve",
]

_DEPTHWISE = {"xla": xla.depthwise_conv, "shift": shift.depthwise_conv,
              "native": kernels.depthwise_conv}  # fmt: skip


def depthwise_conv(x: jax.Array, kernel: jax.Array, impl: str = "xla") -> jax.Array:
    """k x k depthwise conv of NHWC `x` with a (k, k, 1, C) kernel: stride 1, 'SAME' padding,
    no bias, in x's dtype (float32 accumulation for half precision)."""
    k = kernel.shape[0]
    if x.ndim != 4 or kernel.shape != (k, k, 1, x.shape[-1]):
        raise ValueError(
            f"expected x NHWC and kernel (k, k, 1, C); got x {x.shape}, kernel {kernel.shape}"
        )
    return _DEPTHWISE[impl](x, kernel)


def pointwise_conv(x: jax.Array, kernel: jax.Array, impl: str = "xla") -> jax.Array:
    """1x1 conv of `x` (..., C) with a (1, 1, C, D) kernel, no bias, in x's dtype."""
    w = kernel.reshape(kernel.shape[-2:])
    return kernels.pointwise_conv(x, w) if impl == "native" else xla.pointwise_conv(x, w)


def patch_conv(images: jax.Array, kernel: jax.Array, impl: str = "xla") -> jax.Array:
    """The patch embedding: a (p, p, C, D) conv with stride p, no bias, in the images' dtype."""
    patch = kernel.shape[0]
    if impl == "native":
        return kernels.patch_conv(images, kernel, patch)
    return xla.patch_conv(images, kernel, patch)


def fold_batch_norm(scale, bias, mean, var, eps: float) -> tuple[jax.Array, jax.Array]:
    """Eval-mode BatchNorm (y - mean) / sqrt(var + eps) * scale + bias as y * s + t."""
    s = scale * jax.lax.rsqrt(var + eps)
    return s, bias - mean * s


def depthwise_layer(x, kernel, bias, scale, shift_, activation: str, impls: Impls):
    """x + act(depthwise(x) + bias) * scale + shift: a mixer block's first layer in eval mode,
    with its BatchNorm folded (`fold_batch_norm`)."""
    if impls.layers:
        return kernels.depthwise_layer(x, kernel, bias, scale, shift_, activation)
    y = depthwise_conv(x, kernel, impls.depthwise) + bias.astype(x.dtype)
    return x + (activate(y, activation) * scale + shift_).astype(x.dtype)


def pointwise_layer(x, kernel, bias, scale, shift_, activation: str, impls: Impls):
    """act(pointwise(x) + bias) * scale + shift: a block's second layer in eval mode, likewise."""
    w = kernel.reshape(kernel.shape[-2:])
    if impls.layers:
        return kernels.pointwise_layer(x, w, bias, scale, shift_, activation)
    return _act_affine(pointwise_conv(x, kernel, impls.pointwise), bias, scale, shift_, activation)


def patch_layer(images, kernel, bias, scale, shift_, activation: str, impls: Impls):
    """act(patch_conv(images) + bias) * scale + shift: the stem in eval mode, likewise."""
    if impls.layers:
        flat = kernel.reshape(-1, kernel.shape[-1])
        patches = kernels.patches(images, kernel.shape[0])
        return kernels.pointwise_layer(patches, flat, bias, scale, shift_, activation)
    return _act_affine(patch_conv(images, kernel), bias, scale, shift_, activation)


def _act_affine(y, bias, scale, shift_, activation: str):
    return (activate(y + bias.astype(y.dtype), activation) * scale + shift_).astype(y.dtype)
