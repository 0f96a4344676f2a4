"""ConvMixer's layers in inference, each as one call of the CPU kernels.

In eval mode BatchNorm is a per-channel affine map (running statistics), so a mixer block is

    x = x + act(depthwise(x) + b1) * s1 + t1
    y = act(x @ w + b2) * s2 + t2

and the stem is the second line on the image's flattened p x p patches. With the native kernels
each line is one custom call (`csrc/depthwise_cpu.cc`'s DepthwiseResidualActAffine,
`csrc/matmul_cpu.cc`'s MatmulBiasActAffine) that applies bias, activation, the folded BatchNorm
and the residual to each output tile while it is still in registers, where otherwise XLA makes
two more passes over the activations per block. Profiling ConvMixer-768/32's jitted inference
forward (batch 8, 224 px, float32, 2-core AMD EPYC VM; `XLA_FLAGS=--xla_cpu_enable_xprof_traceme=
true` and `jax.profiler.trace`) showed ~245 ms of ~3.5 s in those passes.

Activations: the identity, ReLU and the exact GELU (the kernels' erfc approximation is within
1.5e-7 of the true one). Gradients, where asked for, are those of the same layers written out with
the unfused kernels.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from convmixer_jax import native
from convmixer_jax.actnorm import activate
from convmixer_jax.depthwise import depthwise_conv, same_pads
from convmixer_jax.pointwise import pointwise


def fold_batch_norm(scale, bias, mean, var, eps: float) -> tuple[jax.Array, jax.Array]:
    """Eval-mode BatchNorm (y - mean) / sqrt(var + eps) * scale + bias as y * s + t."""
    s = scale * jax.lax.rsqrt(var + eps)
    return s, bias - mean * s


def _depthwise_reference(x, kernel, bias, scale, shift, activation):
    y = depthwise_conv(x, kernel, impl="native") + bias
    return x + activate(y, activation) * scale + shift


def _pointwise_reference(x, w, bias, scale, shift, activation):
    return activate(pointwise(x, w, impl="native") + bias, activation) * scale + shift


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


@_differentiable_as(_depthwise_reference)
def depthwise_layer(x, kernel, bias, scale, shift, activation):
    """x + act(depthwise(x, kernel) + bias) * scale + shift: NHWC float32 x, (k, k, 1, C) kernel."""
    k = kernel.shape[0]
    return native.call(
        native.DEPTHWISE_LAYER,
        x.shape,
        x,
        kernel[:, :, 0, :],
        bias,
        scale,
        shift,
        pad_lo=np.int64(same_pads(k)[0]),
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
