"""ConvMixer ("Patches Are All You Need?") as Flax NNX modules, and the registry of variants.

The architecture follows the authors' code and timm exactly: a strided patch-embedding conv, then
`depth` blocks of [residual depthwise conv -> act -> BN] -> pointwise conv -> act -> BN, then global
average pooling and a linear head. Order is conv -> act -> BN everywhere, GELU is the exact (erf)
form, BatchNorm uses PyTorch's momentum 0.1 / eps 1e-5 and initialisation is PyTorch's default, so
converted PyTorch weights give the same logits.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from convmixer_jax import actnorm, depthwise, fused, pointwise
from convmixer_jax.actnorm import ACTIVATIONS, act_batch_norm, activate

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered variant: architecture plus the preprocessing its released weights expect."""

    width: int
    depth: int
    kernel_size: int
    patch_size: int
    activation: str = "gelu"
    num_classes: int = 1000
    image_size: int = 224
    crop_pct: float = 0.96
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


MODELS: dict[str, ModelSpec] = {
    "convmixer_1536_20": ModelSpec(1536, 20, 9, 7, "gelu"),
    "convmixer_768_32": ModelSpec(768, 32, 7, 7, "relu"),
    "convmixer_1024_20_ks9_p14": ModelSpec(1024, 20, 9, 14, "gelu"),
    # The authors' CIFAR-10 model (ConvMixer-256/8, k5, p2).
    "convmixer_256_8": ModelSpec(256, 8, 5, 2, "gelu", num_classes=10, image_size=32, crop_pct=1.0),
    # A small model that trains in minutes on a laptop CPU (the quickstart).
    "convmixer_tiny": ModelSpec(96, 4, 5, 2, "gelu", num_classes=10, image_size=32, crop_pct=1.0),
}


def list_models() -> list[str]:
    """Names of the registered ConvMixer variants."""
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The registered spec of `name`, or a ValueError listing the valid names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return MODELS[name]


def _torch_uniform(fan_in: int) -> nnx.Initializer:
    """PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# PyTorch's default weight init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)).
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _conv(cin: int, cout: int, k: int, stride: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=stride,
        padding="VALID",
        dtype=dtype,
        kernel_init=_torch_kernel_init,
        bias_init=_torch_uniform(cin * k * k),
        rngs=rngs,
    )


class GroupBatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm (same variables) whose train-mode statistics cover groups of images.

    With `group_size` > 0 each run of `group_size` consecutive images of the batch is normalised
    with its own mean and (biased) variance, as one GPU's batch is with unsynced BatchNorm; the
    running statistics move towards the mean over groups of those. 0: the whole batch (sync-BN).
    Channels-last inputs only. `activated(y, act, train, shift, residual)` is
    self(act(y + shift)) + residual with the activation folded into the normalisation's
    hand-written backward pass (`convmixer_jax.actnorm`, whose implementation `impl` names).
    """

    def __init__(self, num_features: int, *, group_size: int = 0, impl: str = "auto", **kwargs):
        super().__init__(num_features, **kwargs)
        self.group_size = group_size
        self.impl = impl

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        if use_running_average is None:
            use_running_average = self.use_running_average
        return self.activated(x, "identity", train=not use_running_average)

    def activated(
        self,
        y: jax.Array,
        activation: str,
        train: bool,
        shift: jax.Array | None = None,
        residual: jax.Array | None = None,
    ) -> jax.Array:
        dtype = self.dtype or y.dtype
        if shift is None:
            shift = jnp.zeros((y.shape[-1],), jnp.float32)
        if not train:
            out = super().__call__(
                activate(y + shift.astype(y.dtype), activation), use_running_average=True
            )
            return out if residual is None else residual + out
        batch = y.shape[0]
        group = self.group_size or batch
        if batch % group:
            raise ValueError(f"bn_group_size {group} does not divide the batch of {batch} images")

        def grouped(v):
            return v.astype(dtype).reshape(batch // group, group, *y.shape[1:])

        out, mean, var = act_batch_norm(
            grouped(y),
            shift.astype(jnp.float32),
            self.scale[...],
            self.bias[...],
            None if residual is None else grouped(residual),
            activation,
            self.epsilon,
            actnorm.resolve_impl(self.impl, dtype),
        )
        over_groups = tuple(range(mean.ndim - 1))
        for running, value in ((self.mean, mean), (self.var, var)):
            update = self.momentum * running[...] + (1 - self.momentum) * value.mean(over_groups)
            running[...] = jax.lax.stop_gradient(update)
        return out.reshape(y.shape)

    def folded(self) -> tuple[jax.Array, jax.Array]:
        """Eval-mode normalisation as a per-channel y * s + t (float32)."""
        return fused.fold_batch_norm(
            self.scale[...], self.bias[...], self.mean[...], self.var[...], self.epsilon
        )


def _batch_norm(
    width: int, dtype, rngs: nnx.Rngs, group_size: int = 0, impl: str = "auto"
) -> GroupBatchNorm:
    # PyTorch momentum 0.1 is Flax momentum 0.9.
    return GroupBatchNorm(
        width,
        group_size=group_size,
        impl=impl,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        rngs=rngs,
    )


class DepthwiseConv(nnx.Module):
    """k x k depthwise conv, 'SAME' padding, bias; kernel (k, k, 1, C) as in a grouped nnx.Conv."""

    def __init__(self, width: int, kernel_size: int, *, dtype, impl: str, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, 1, width)
        self.kernel = nnx.Param(_torch_kernel_init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(_torch_uniform(kernel_size * kernel_size)(rngs.params(), (width,)))
        self.dtype = dtype
        self.impl = impl

    def __call__(self, x: jax.Array) -> jax.Array:
        """The convolution without its bias, which the normalisation after it adds (the `shift`
        of `GroupBatchNorm.activated`)."""
        dtype = self.dtype or x.dtype
        kernel = self.kernel[...].astype(dtype)
        return depthwise.depthwise_conv(x.astype(dtype), kernel, impl=self.impl)


class PointwiseConv(nnx.Module):
    """1x1 conv as a matrix product over channels (`pointwise.pointwise`; with impl 'xla' remat's
    dot policies see it), with bias; kernel (1, 1, C, C) as in an nnx.Conv."""

    def __init__(self, width: int, *, dtype, impl: str, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_torch_kernel_init(rngs.params(), (1, 1, width, width)))
        self.bias = nnx.Param(_torch_uniform(width)(rngs.params(), (width,)))
        self.dtype = dtype
        self.impl = impl

    def __call__(self, x: jax.Array) -> jax.Array:
        """The 1x1 convolution without its bias, which the normalisation after it adds (the `shift`
        of `GroupBatchNorm.activated`)."""
        dtype = self.dtype or x.dtype
        kernel = self.kernel[...][0, 0].astype(dtype)
        return pointwise.pointwise(x.astype(dtype), kernel, impl=self.impl)


class MixerBlock(nnx.Module):
    """Residual(depthwise conv -> act -> BN) -> pointwise conv -> act -> BN."""

    def __init__(
        self,
        width,
        kernel_size,
        *,
        activation,
        dtype,
        depthwise_impl,
        pointwise_impl,
        rngs,
        bn_group_size=0,
    ):
        self.depthwise = DepthwiseConv(
            width, kernel_size, dtype=dtype, impl=depthwise_impl, rngs=rngs
        )
        # The normalisations run on the CPU kernels where the pointwise product does.
        self.norm1 = _batch_norm(width, dtype, rngs, bn_group_size, pointwise_impl)
        self.pointwise = PointwiseConv(width, dtype=dtype, impl=pointwise_impl, rngs=rngs)
        self.norm2 = _batch_norm(width, dtype, rngs, bn_group_size, pointwise_impl)
        self.activation = activation

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train and self.native(x.dtype):
            return self._fused_eval(x)
        dw, pw = self.depthwise, self.pointwise
        x = self.norm1.activated(dw(x), self.activation, train, dw.bias[...], x)
        return self.norm2.activated(pw(x), self.activation, train, pw.bias[...])

    def native(self, dtype) -> bool:
        """Whether both convs run on the CPU kernels for `dtype` inputs (float32 only); eval mode
        then runs each layer as one fused kernel call (`fused.py`)."""
        dtype = self.depthwise.dtype or dtype
        return (
            jnp.dtype(dtype) == jnp.float32
            and depthwise.resolve_impl(self.depthwise.impl) == "native"
            and pointwise.resolve_impl(self.pointwise.impl, dtype) == "native"
        )

    def _fused_eval(self, x: jax.Array) -> jax.Array:
        dw, pw = self.depthwise, self.pointwise
        x = fused.depthwise_layer(
            x.astype(jnp.float32),
            dw.kernel[...],
            dw.bias[...],
            *self.norm1.folded(),
            self.activation,
        )
        w = pw.kernel[...][0, 0]
        return fused.pointwise_layer(x, w, pw.bias[...], *self.norm2.folded(), self.activation)


REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep pointwise outputs
}


def _run_blocks(blocks: nnx.List, x: jax.Array, train: bool, scan: bool, remat: str):
    """Applies the mixer blocks, as a `lax.scan` over their stacked variables when `scan`.

    Scanning compiles one block instead of `depth` copies, so compile time stays flat as depth
    grows. The variables keep their per-block layout (params/blocks/<i>/...), so checkpoints and
    converted weights load either way; only BatchNorm statistics are written back.

    Blocks on the CPU kernels (`MixerBlock.native`) stay unrolled: made of custom calls, they
    compile faster unrolled, and the scan's copies cost time. It stacks every block's weights on
    each call and copies each block's saved activations into stacked buffers (XLA cannot have a
    custom call write into them). ConvMixer-768/32, batch 8, 224 px, float32, 2-core CPU
    (`python -m convmixer_jax.benchmark model --config configs/convmixer_768_32.py --batch_size 8
    --image_size 224 --dtype float32 --config.model.remat=none --config.bn_group_size=0 --steps 2
    --repeats 2 --config.model.scan=False|True`): train 0.776 against 0.677 img/s, compile 15.6
    against 26.3 s, peak memory 4.8 against 3.6 GiB. The eval forward's first call (compile
    included) took 3.1 s unrolled against 3.8 s scanned.
    """
    graphdef = nnx.graphdef(blocks[0])

    def body(x, state):
        block = nnx.merge(graphdef, state)
        return block(x, train), nnx.state(block, nnx.BatchStat)

    if REMAT_POLICIES[remat] is not None:
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    states = [nnx.state(block) for block in blocks]
    if scan and len(blocks) > 1 and not blocks[0].native(x.dtype):
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        x, new_stats = jax.lax.scan(body, x, stacked)
        new_stats = [jax.tree.map(lambda s, i=i: s[i], new_stats) for i in range(len(blocks))]
    else:
        new_stats = []
        for state in states:
            x, stats = body(x, state)
            new_stats.append(stats)
    if train:
        for block, stats in zip(blocks, new_stats, strict=True):
            nnx.update(block, stats)
    return x


def pointwise_impl_under_remat(pointwise_impl: str, remat: str) -> str:
    """The pointwise implementation a ConvMixer with `remat` runs: under 'dots' the products must
    be XLA dots for the policy to see them ('auto' becomes 'xla'; 'native' is refused)."""
    if remat != "dots":
        return pointwise_impl
    if pointwise_impl == "native":
        raise ValueError(
            "remat 'dots' cannot see pointwise_impl 'native' products; use remat "
            "'block' or 'none', or pointwise_impl 'xla' or 'auto'"
        )
    return "xla"


class ConvMixer(nnx.Module):
    """ConvMixer-h/d: NHWC images whose size the patch size divides -> float32 logits.

    `depthwise_impl` and `pointwise_impl` pick the implementations of the two convs
    (`depthwise.py`, `pointwise.py`); `scan` runs the identical mixer blocks as one `lax.scan`;
    `remat` ('none', 'block' or 'dots') recomputes activations in the backward pass to save
    memory; `bn_group_size` > 0 computes train-mode BatchNorm statistics per group of that many
    images (GroupBatchNorm).
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        kernel_size: int,
        patch_size: int,
        num_classes: int,
        activation: str = "gelu",
        in_channels: int = 3,
        dtype=jnp.float32,
        depthwise_impl: str = "auto",
        pointwise_impl: str = "auto",
        scan: bool = True,
        remat: str = "none",
        bn_group_size: int = 0,
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {remat!r}; choose one of {list(REMAT_POLICIES)}")
        pointwise_impl = pointwise_impl_under_remat(pointwise_impl, remat)
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {list(ACTIVATIONS)}"
            )
        self.patch_size = patch_size
        self.activation = activation
        self.dtype = dtype
        self.scan = scan
        self.remat = remat
        self.stem = _conv(in_channels, width, patch_size, patch_size, dtype, rngs)
        self.stem_norm = _batch_norm(width, dtype, rngs, bn_group_size, pointwise_impl)
        self.blocks = nnx.List(
            [
                MixerBlock(
                    width,
                    kernel_size,
                    activation=activation,
                    dtype=dtype,
                    depthwise_impl=depthwise_impl,
                    pointwise_impl=pointwise_impl,
                    rngs=rngs,
                    bn_group_size=bn_group_size,
                )
                for _ in range(depth)
            ]
        )
        self.head = nnx.Linear(
            width,
            num_classes,
            kernel_init=_torch_kernel_init,
            bias_init=_torch_uniform(width),
            rngs=rngs,
        )

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        height, width = images.shape[-3:-1]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not divisible by patch size {self.patch_size}; "
                "use an image_size that is a multiple of it"
            )
        if self.blocks[0].native(self.dtype or images.dtype):
            x = self._native_stem(images.astype(jnp.float32), train)
        else:
            x = self.stem(images.astype(self.dtype))
            x = self.stem_norm.activated(x, self.activation, train)
        x = _run_blocks(self.blocks, x, train, self.scan, self.remat)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(-3, -2))
        return self.head(pooled)

    def _native_stem(self, images: jax.Array, train: bool) -> jax.Array:
        """The stem on the CPU kernels: non-overlapping p x p patches (flattened in the conv
        kernel's (row, column, channel) order) times the kernel, then bias, act and BatchNorm; in
        eval mode one fused kernel call with the folded BatchNorm. XLA's strided conv took ~55-70
        ms of ConvMixer-768/32's inference, and its weight gradient ~38 ms of ConvMixer-256/8's
        train step (batch 128)."""
        n, h, w, c = images.shape
        p = self.patch_size
        patches = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, h // p, w // p, p * p * c)
        kernel = self.stem.kernel[...].reshape(p * p * c, -1)
        bias = self.stem.bias[...]
        if train:
            y = pointwise.pointwise(patches, kernel, impl="native")
            return self.stem_norm.activated(y, self.activation, True, bias)
        return fused.pointwise_layer(
            patches, kernel, bias, *self.stem_norm.folded(), self.activation
        )


def forward_flops(
    *,
    width: int,
    depth: int,
    kernel_size: int,
    patch_size: int,
    num_classes: int,
    image_size: int,
    in_channels: int = 3,
) -> int:
    """Forward FLOPs (2 x multiply-adds) per image, depthwise convs included.

    (timm's published GMACs leave the depthwise convs out; this count is what MFU needs.)
    """
    tokens = (image_size // patch_size) ** 2
    stem = tokens * in_channels * patch_size**2 * width
    blocks = depth * tokens * (kernel_size**2 * width + width * width)
    return 2 * (stem + blocks + width * num_classes)


def count_params(model_or_state) -> int:
    """Number of trainable parameters (BatchNorm running statistics excluded)."""
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


ARCHITECTURE_FIELDS = ("width", "depth", "kernel_size", "patch_size", "activation")


def config_architecture(model_config) -> dict:
    """Width, depth, kernel_size, patch_size, activation and num_classes of a config's `model`
    section: its own value where set, else the registered variant's."""
    spec = get_spec(model_config.name)
    fields = (*ARCHITECTURE_FIELDS, "num_classes")
    return {field: model_config[field] or getattr(spec, field) for field in fields}


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    rngs: nnx.Rngs | None = None,
    dtype=jnp.float32,
    depthwise_impl: str = "auto",
    pointwise_impl: str = "auto",
    scan: bool = True,
    remat: str = "none",
    bn_group_size: int = 0,
    **overrides,
) -> ConvMixer:
    """Builds the registered variant `name`; `overrides` replace width/depth/kernel_size/...

    Example: `create_model('convmixer_768_32', num_classes=10, depth=8)`.
    """
    spec = get_spec(name)
    fields = {field: getattr(spec, field) for field in ARCHITECTURE_FIELDS}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}; valid: {sorted(fields)}")
    fields.update({k: v for k, v in overrides.items() if v})
    return ConvMixer(
        **fields,
        num_classes=num_classes or spec.num_classes,
        dtype=dtype,
        depthwise_impl=depthwise_impl,
        pointwise_impl=pointwise_impl,
        scan=scan,
        remat=remat,
        bn_group_size=bn_group_size,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
    )


def from_config(config, num_classes: int, seed: int) -> ConvMixer:
    """The model of a training config: its `model` section, `dtype` and `bn_group_size`."""
    m = config.model
    return create_model(
        m.name,
        num_classes=num_classes,
        rngs=nnx.Rngs(seed),
        dtype=jnp.dtype(config.dtype),
        depthwise_impl=m.depthwise_impl,
        pointwise_impl=m.pointwise_impl,
        scan=m.scan,
        remat=m.remat,
        bn_group_size=config.bn_group_size,
        **{field: m[field] for field in ARCHITECTURE_FIELDS},
    )
