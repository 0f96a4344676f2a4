"""The registered ConvMixer variants and `create_model`, the one way to build one."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from convmixer_jax.model.convmixer import ConvMixer

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
ARCHITECTURE_FIELDS = ("width", "depth", "kernel_size", "patch_size", "activation")


def list_models() -> list[str]:
    """Names of the registered ConvMixer variants."""
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The registered spec of `name`, or a ValueError listing the valid names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return MODELS[name]


def config_architecture(model_config) -> dict:
    """Width, depth, kernel_size, patch_size, activation and num_classes of a config's `model`
    section: its own value where set, else the registered variant's."""
    spec = get_spec(model_config.name)
    fields = (*ARCHITECTURE_FIELDS, "num_classes")
    return {field: model_config[field] or getattr(spec, field) for field in fields}


def create_model(
    name: str,
    *,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    rngs: nnx.Rngs | None = None,
    dtype=jnp.float32,
    depthwise_impl: str = "auto",
    pointwise_impl: str = "auto",
    scan: bool = True,
    remat: str = "none",
    bn_group_size: int = 0,
    devices=None,
    **overrides,
) -> ConvMixer:
    """The registered variant `name`; `overrides` replace width/depth/kernel_size/...

    With `checkpoint` (a workdir, its checkpoints/ directory, one step of it, or the output of
    `python -m convmixer_jax.convert`) its weights are loaded; the architecture must be the
    checkpoint's. Call the model as `model(images)` on float32 NHWC images normalised with the
    variant's mean/std (`get_spec(name)`) for logits. Example:
    `create_model('convmixer_768_32', num_classes=10, depth=8)`.
    """
    spec = get_spec(name)
    fields = {field: getattr(spec, field) for field in ARCHITECTURE_FIELDS}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}; valid: {sorted(fields)}")
    fields.update({k: v for k, v in overrides.items() if v})

    def build(rngs):
        return ConvMixer(
            **fields, num_classes=num_classes or spec.num_classes, dtype=dtype,
            depthwise_impl=depthwise_impl, pointwise_impl=pointwise_impl, scan=scan,
            remat=remat, bn_group_size=bn_group_size, devices=devices, rngs=rngs,
        )  # fmt: skip

    if checkpoint is None:
        return build(rngs if rngs is not None else nnx.Rngs(0))
    from convmixer_jax.weights import pretrained

    return pretrained.load(nnx.eval_shape(lambda: build(nnx.Rngs(0))), checkpoint)


def from_config(config, num_classes: int, seed: int, devices=None) -> ConvMixer:
    """The model of a training config (its `model` section, `dtype` and `bn_group_size`) for
    `devices`, the devices it will be compiled for (default: this process's)."""
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
        devices=devices,
        **{field: m[field] for field in ARCHITECTURE_FIELDS},
    )
