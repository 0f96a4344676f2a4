"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter, 2022) as Flax NNX modules.

    patches:  x = BN(act(conv_p(image)))              a p x p conv with stride p
    block:    x = x + BN(act(depthwise_k(x)))         repeated depth times
              x = BN(act(pointwise(x)))
    head:     logits = linear(mean over pixels of x)

Order conv -> act -> BN everywhere, as the authors and timm write it, with exact GELU and
PyTorch's BatchNorm (momentum 0.1, eps 1e-5) and initialisation, so converted timm weights give
the same logits. Each conv leaves its bias to the activation+BatchNorm after it, which adds it
in the same pass. Which implementation computes each operation is `ops.policy`'s choice.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from convmixer_jax import ops

# PyTorch's default weight init (kaiming_uniform, a=sqrt(5)) is U(+-1/sqrt(fan_in)).
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_uniform(fan_in: int) -> nnx.Initializer:
    """PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nnx.Module):
    """A convolution (HWIO kernel, bias) of kind 'patch' (stride = size), 'depthwise' ('SAME',
    one input channel per output) or 'pointwise' (1x1). Returns the output without its bias."""

    _OPS = {
        "patch": ops.patch_conv,
        "depthwise": ops.depthwise_conv,
        "pointwise": ops.pointwise_conv,
    }

    def __init__(self, cin, cout, size, *, kind: str, impl: str, dtype, rngs: nnx.Rngs):
        shape = (size, size, cin, cout)
        self.kernel = nnx.Param(_torch_kernel_init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(_torch_uniform(size * size * cin)(rngs.params(), (cout,)))
        self.kind, self.impl, self.dtype = kind, impl, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        return self._OPS[self.kind](x.astype(self.dtype), kernel, self.impl)


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm (same variables) fed by a conv: BN(act(y + bias)), its train-mode
    statistics over groups of `group_size` consecutive images (0: the whole batch), as the
    authors' per-GPU batches were normalised; running statistics average over the groups."""

    def __init__(self, width: int, *, group_size: int, impl: str, dtype, rngs: nnx.Rngs):
        super().__init__(width, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.group_size, self.impl = group_size, impl

    def __call__(self, y, bias, activation: str, train: bool):
        dtype = self.dtype or y.dtype
        if not train:
            a = ops.activate(y + bias.astype(y.dtype), activation)
            return super().__call__(a, use_running_average=True)
        batch = y.shape[0]
        group = self.group_size or batch
        if batch % group:
            raise ValueError(f"bn_group_size {group} does not divide the batch of {batch} images")
        groups = y.astype(dtype).reshape(batch // group, group, *y.shape[1:])
        out, mean, var = ops.act_batch_norm(
            groups, bias.astype(jnp.float32), self.scale[...], self.bias[...], None,
            activation, self.epsilon, self.impl,
        )  # fmt: skip
        for running, value in ((self.mean, mean), (self.var, var)):
            batch_value = value.mean(tuple(range(value.ndim - 1)))
            update = self.momentum * running[...] + (1 - self.momentum) * batch_value
            running[...] = jax.lax.stop_gradient(update)
        return out.reshape(y.shape)


class MixerBlock(nnx.Module):
    """x + BN(act(depthwise(x))), then BN(act(pointwise(x)))."""

    def __init__(self, width, kernel_size, *, activation, dtype, impls, group_size, rngs):
        def norm():
            return BatchNorm(
                width, group_size=group_size, impl=impls.pointwise, dtype=dtype, rngs=rngs
            )

        self.depthwise = Conv(1, width, kernel_size, kind="depthwise", impl=impls.depthwise,
                              dtype=dtype, rngs=rngs)  # fmt: skip
        self.norm1 = norm()
        self.pointwise = Conv(width, width, 1, kind="pointwise", impl=impls.pointwise,
                              dtype=dtype, rngs=rngs)  # fmt: skip
        self.norm2 = norm()
        self.activation = activation

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act, dw, pw = self.activation, self.depthwise, self.pointwise
        x = x + self.norm1(dw(x), dw.bias[...], act, train)
        return self.norm2(pw(x), pw.bias[...], act, train)


REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep pointwise outputs
}


def run_blocks(blocks: nnx.List, x: jax.Array, train: bool, scan: bool, remat: str) -> jax.Array:
    """Applies the mixer blocks, as one `lax.scan` over their stacked variables when `scan` (one
    block compiled instead of `depth`). The variables keep their per-block layout
    (params/blocks/<i>/...), so checkpoints load either way; BatchNorm statistics are written
    back."""
    graphdef = nnx.graphdef(blocks[0])

    def body(x, state):
        block = nnx.merge(graphdef, state)
        return block(x, train), nnx.state(block, nnx.BatchStat)

    if REMAT_POLICIES[remat] is not None:
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    states = [nnx.state(block) for block in blocks]
    if scan and len(blocks) > 1:
        x, stacked = jax.lax.scan(body, x, jax.tree.map(lambda *s: jnp.stack(s), *states))
        new_stats = [jax.tree.map(lambda s, i=i: s[i], stacked) for i in range(len(blocks))]
    else:
        new_stats = []
        for state in states:
            x, stats = body(x, state)
            new_stats.append(stats)
    if train:
        for block, stats in zip(blocks, new_stats, strict=True):
            nnx.update(block, stats)
    return x


class ConvMixer(nnx.Module):
    """ConvMixer-h/d: NHWC images whose size the patch size divides -> float32 logits.

    `depthwise_impl` and `pointwise_impl` ('auto' or a name) pick the implementations, resolved
    by `ops.policy` for `devices` (default: this process's JAX devices) and `dtype`; `scan` runs
    the mixer blocks as one `lax.scan`; `remat` ('none', 'block' or 'dots') recomputes
    activations in the backward pass to save memory; `bn_group_size` > 0 computes train-mode
    BatchNorm statistics per group of that many images.
    """

    def __init__(
        self, *, width: int, depth: int, kernel_size: int, patch_size: int, num_classes: int,
        activation: str = "gelu", in_channels: int = 3, dtype=jnp.float32,
        depthwise_impl: str = "auto", pointwise_impl: str = "auto", scan: bool = True,
        remat: str = "none", bn_group_size: int = 0, devices=None, rngs: nnx.Rngs,
    ):  # fmt: skip
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {ops.ACTIVATIONS}")
        self.impls = ops.resolve(
            depthwise_impl, pointwise_impl, dtype=dtype, remat=remat, scan=scan, devices=devices
        )
        self.patch_size, self.activation, self.remat = patch_size, activation, remat
        self.stem = Conv(in_channels, width, patch_size, kind="patch", impl=self.impls.patch,
                         dtype=dtype, rngs=rngs)  # fmt: skip
        self.stem_norm = BatchNorm(width, group_size=bn_group_size, impl=self.impls.pointwise,
                                   dtype=dtype, rngs=rngs)  # fmt: skip
        self.blocks = nnx.List([
            MixerBlock(width, kernel_size, activation=activation, dtype=dtype, impls=self.impls,
                       group_size=bn_group_size, rngs=rngs)
            for _ in range(depth)
        ])  # fmt: skip
        self.head = nnx.Linear(
            width, num_classes, kernel_init=_torch_kernel_init, bias_init=_torch_uniform(width),
            rngs=rngs,
        )  # fmt: skip

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        check_image_size(images, self.patch_size)
        x = self.stem_norm(self.stem(images), self.stem.bias[...], self.activation, train)
        x = run_blocks(self.blocks, x, train, self.impls.scan, self.remat)
        return self.head(jnp.mean(x.astype(jnp.float32), axis=(-3, -2)))


def check_image_size(images: jax.Array, patch: int) -> None:
    height, width = images.shape[-3:-1]
    if height % patch or width % patch:
        raise ValueError(
            f"image size {height}x{width} is not divisible by patch size {patch}; "
            "use an image_size that is a multiple of it"
        )
