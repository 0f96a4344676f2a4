"""Eval-mode ConvMixer with each BatchNorm folded into the layer before it.

In eval mode BatchNorm is a per-channel affine map (running statistics), so a mixer block is

    x = x + act(depthwise(x) + b1) * s1 + t1
    y = act(pointwise(x) + b2) * s2 + t2

and the stem is the second line on the image's patches. `reparameterize` turns a trained model
into these layers, as timm's `reparameterize_model` does; each is one `ops.*_layer` call, which
on the CPU kernels is one kernel pass per layer instead of three.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from convmixer_jax import ops
from convmixer_jax.model.convmixer import ConvMixer, check_image_size


class Layer(NamedTuple):
    """A conv whose output goes through act(y + bias) * scale + shift."""

    kernel: jax.Array
    bias: jax.Array
    scale: jax.Array
    shift: jax.Array


def _fold(conv, norm) -> Layer:
    scale, shift = ops.fold_batch_norm(
        norm.scale[...], norm.bias[...], norm.mean[...], norm.var[...], norm.epsilon
    )
    return Layer(conv.kernel[...], conv.bias[...], scale, shift)


@dataclasses.dataclass(frozen=True)
class FusedConvMixer:
    """The eval-mode forward of a ConvMixer: images -> float32 logits."""

    stem: Layer
    blocks: tuple[tuple[Layer, Layer], ...]
    head: tuple[jax.Array, jax.Array]
    patch_size: int
    activation: str
    dtype: jnp.dtype
    impls: ops.Impls

    def __call__(self, images: jax.Array) -> jax.Array:
        check_image_size(images, self.patch_size)
        act, impls, dtype = self.activation, self.impls, self.dtype
        # The kernels take float32; XLA runs in the model's dtype.
        dtype = jnp.float32 if impls.layers else dtype
        x = ops.patch_layer(images.astype(dtype), *_cast(self.stem, dtype), act, impls)

        def block(x, layers):
            dw, pw = layers
            x = ops.depthwise_layer(x, *_cast(dw, dtype), act, impls)
            return ops.pointwise_layer(x, *_cast(pw, dtype), act, impls), None

        if impls.scan and len(self.blocks) > 1:  # as the model runs its blocks
            x, _ = jax.lax.scan(block, x, jax.tree.map(lambda *a: jnp.stack(a), *self.blocks))
        else:
            for layers in self.blocks:
                x, _ = block(x, layers)
        kernel, bias = self.head
        return jnp.mean(x.astype(jnp.float32), axis=(-3, -2)) @ kernel + bias


def _cast(layer: Layer, dtype) -> tuple[jax.Array, ...]:
    return layer.kernel.astype(dtype), layer.bias, layer.scale, layer.shift


def reparameterize(model: ConvMixer) -> FusedConvMixer:
    """`model` in eval mode with its BatchNorms folded into the convs."""
    return FusedConvMixer(
        stem=_fold(model.stem, model.stem_norm),
        blocks=tuple(
            (_fold(b.depthwise, b.norm1), _fold(b.pointwise, b.norm2)) for b in model.blocks
        ),
        head=(model.head.kernel[...], model.head.bias[...]),
        patch_size=model.patch_size,
        activation=model.activation,
        dtype=model.stem.dtype,
        impls=model.impls,
    )
