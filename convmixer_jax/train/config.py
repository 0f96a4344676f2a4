"""The shared base config, and the checks that turn a bad config into a one-line error.

Every file in configs/ starts from `base_config()` and overrides a few fields. Model fields left at
0 / '' take the registered variant's value. This module imports no model code, so loading a
config needs only ml_collections; `validate` asks the model registry and the ops policy.
"""

from __future__ import annotations

import re

import ml_collections

from convmixer_jax.data.randaugment_spec import parse_randaugment

DATASETS = ("synthetic_shapes", "image_folder", "cifar10", "imagenet2012")
SCHEDULES = ("onecycle", "cosine")
DTYPES = ("float32", "bfloat16")
NONFINITE = ("skip", "stop")
SHARDINGS = ("replicated", "fsdp")
BAD_IMAGES = ("skip", "error")
TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "random")
# A TFDS name: dataset[/config][:version], e.g. imagenet_v2/matched-frequency or cifar10:3.0.2.
_TFDS_NAME = re.compile(
    r"[a-z][a-z0-9_]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?(:[0-9]+\.[0-9*]+\.[0-9*]+)?"
)


class ConfigError(ValueError):
    """A mistake in the config or the command line; its message names the field and the fix."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every recipe: the paper's ImageNet optimizer settings."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name = "convmixer_1536_20"
    c.model.width = 0  # 0: the registered value (likewise depth, kernel_size, patch_size).
    c.model.depth = 0
    c.model.kernel_size = 0
    c.model.patch_size = 0
    c.model.activation = ""  # '': the registered value; else 'gelu' or 'relu'.
    c.model.num_classes = 0  # 0: taken from the dataset.
    # 'auto' (ops/policy.py picks per device kind, count and dtype), 'xla', 'shift', 'native'.
    c.model.depthwise_impl = "auto"
    c.model.pointwise_impl = "auto"  # 'auto', 'xla', 'native' (CPU kernels).
    c.model.scan = True  # mixer blocks as one lax.scan (flat compile time); not on CPU kernels.
    c.model.remat = "none"  # recompute activations in backward: 'none', 'block' or 'dots'.

    c.dataset = "imagenet2012"
    c.data_dir = ""  # '': TFDS's default (~/tensorflow_datasets); the tree root for image_folder.
    c.train_split = "train"
    c.eval_split = ""  # '': 'validation' if the dataset has it, else 'test', else 'val'.
    # More eval sets, comma-separated TFDS names read from data_dir, evaluated whenever the main
    # eval runs, e.g. 'imagenet_v2/matched-frequency,imagenet2012_real' (metrics
    # eval_imagenet_v2/top1, eval_imagenet2012_real/real_top1, ...); '' for none.
    c.extra_eval_datasets = ""
    c.image_size = 224
    c.crop_pct = 0.875  # eval: resize the shorter side to image_size / crop_pct, center crop.
    c.eval_interpolation = "bicubic"
    c.crop_area_min = 0.08  # train: random resized crop area range [crop_area_min, 1].
    c.crop_aspect_min = 3 / 4
    c.crop_aspect_max = 4 / 3
    c.horizontal_flip = True
    c.train_interpolation = "bilinear"  # crop resize: 'bilinear', 'bicubic' or 'random' (either).
    c.randaugment = ""  # a timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'; '' disables.
    c.random_erase_prob = 0.0  # timm random erasing ('pixel' mode, after normalisation).
    c.mean = (0.485, 0.456, 0.406)  # ImageNet's, as timm normalises it
    c.std = (0.229, 0.224, 0.225)
    c.shuffle_buffer = 16_384
    c.cache_data = False  # keep the encoded dataset in host memory (small datasets only).

    c.batch_size = 640  # global, over all devices and hosts.
    c.eval_batch_size = 0  # 0: batch_size.
    c.num_epochs = 150.0
    c.num_train_steps = 0  # > 0 wins over num_epochs.

    c.schedule = "onecycle"
    c.learning_rate = 0.01
    c.warmup_epochs = 0.0  # cosine schedule only.
    c.weight_decay = 2e-5
    c.weight_decay_all = False  # False: decay only >= 2-D params (not biases / BatchNorm).
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-3
    c.grad_clip_norm = 1.0  # 0 disables clipping.
    c.label_smoothing = 0.1
    # Mixup/CutMix on the accelerator (timm's); both alphas 0 disables mixing.
    c.mixup_alpha = 0.0  # Mixup lambda ~ Beta(alpha, alpha); 0 disables Mixup.
    c.cutmix_alpha = 0.0  # CutMix lambda ~ Beta(alpha, alpha); 0 disables CutMix.
    c.mixup_switch_prob = 0.5  # with both enabled: probability of CutMix instead of Mixup.
    c.mixup_group_size = 0  # one draw per group of this many images (paper: 64); 0: whole batch.
    c.bn_group_size = 0  # train BatchNorm statistics per group of images (paper: 64); 0: sync-BN.

    c.sharding = "replicated"  # training state: 'replicated' or 'fsdp' (sharded along 'data').
    # The hardware this run is laid out for (--config FILE:TARGET), one of `targets`: the
    # targets the config names, each with the per-device layout that fits it (`sized_for`).
    c.target = ""
    c.targets = ""
    c.seed = 0
    c.dtype = "bfloat16"
    c.log_every_steps = 100
    c.eval_every_steps = 0  # 0: evaluate only at the end.
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.checkpoint = ""  # --mode eval: a checkpoint to evaluate instead of the workdir's newest.
    # Fine-tuning: start a new run from this checkpoint's weights (a converted one too), with a
    # fresh optimizer at step 0 and a new head if the class count differs. '': from scratch.
    c.init_from = ""
    c.nonfinite = "skip"  # non-finite loss/gradients: 'skip' the update (counted) or 'stop'.
    c.bad_images = "skip"  # undecodable images: 'skip' them (counted) or stop with an 'error'.
    return c


def imagenet_config() -> ml_collections.ConfigDict:
    """The authors' ImageNet recipe (timm settings) on top of the base: data, augmentation,
    Mixup/CutMix and per-64-image BatchNorm; model configs add the model and epoch count."""
    c = base_config()
    c.dataset = "imagenet2012"
    c.crop_pct = 0.96
    c.train_interpolation = "random"  # timm: bilinear or bicubic per image
    c.randaugment = "rand-m9-mstd0.5-inc1"
    c.random_erase_prob = 0.25
    c.mixup_alpha = 0.5
    c.cutmix_alpha = 0.5
    c.mixup_switch_prob = 0.5
    c.mixup_group_size = 64  # one draw per 64 images, as on each of the authors' GPUs
    c.bn_group_size = 64  # BatchNorm statistics per 64 images, as on each of the authors' GPUs
    c.eval_every_steps = 10_000
    c.checkpoint_every_steps = 2_000
    # ImageNet-V2 and ReaL stay off: each needs preparing first (README), then
    # --config.extra_eval_datasets=imagenet_v2/matched-frequency,imagenet2012_real adds them.
    return c


def sized_for(c: ml_collections.ConfigDict, target: str, layouts: dict[str, dict]):
    """`c` laid out for `target`: `layouts` maps each target the config names to the fields
    that differ there (remat, group sizes, ...); '' keeps the config's own layout. An unknown
    target is reported by `validate`, as a one-line error."""
    c.targets = ",".join(layouts)
    c.target = target
    for key, value in layouts.get(target, {}).items():
        node, _, leaf = key.rpartition(".")
        (c[node] if node else c)[leaf] = value
    return c


def extra_eval_datasets(c: ml_collections.ConfigDict) -> dict[str, str]:
    """The extra eval sets as {metric prefix: TFDS name}, e.g.
    {'eval_imagenet_v2': 'imagenet_v2/matched-frequency'}; ConfigError for a malformed list."""
    out: dict[str, str] = {}
    if not c.extra_eval_datasets.strip():
        return out
    for name in (n.strip() for n in c.extra_eval_datasets.split(",")):
        _require(
            _TFDS_NAME.fullmatch(name) is not None,
            f"extra_eval_datasets: {name!r} is not a TFDS name; use comma-separated names like "
            "'imagenet_v2/matched-frequency,imagenet2012_real'",
        )
        prefix = "eval_" + name.split("/")[0].split(":")[0]
        _require(
            prefix not in out,
            f"extra_eval_datasets: {out.get(prefix)!r} and {name!r} would both report as "
            f"{prefix}/...; list each dataset once",
        )
        out[prefix] = name
    return out


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def group_sizes(batch_size: int, device_count: int) -> list[int]:
    """Group sizes that never straddle devices: those dividing the per-device batch, and the
    multiples of it that divide the batch (groups of whole devices)."""
    per_device = batch_size // device_count
    within = [g for g in range(1, per_device + 1) if per_device % g == 0]
    spanning = [g for g in range(2 * per_device, batch_size + 1, per_device) if batch_size % g == 0]
    return within + spanning


def _check_group_layout(key: str, size: int, batch_size: int, device_count: int) -> None:
    """A group (of Mixup draws or BatchNorm statistics) must lie inside one device's share of
    the batch or span whole devices: one that straddles a device boundary makes XLA gather the
    whole batch and compute it on every device."""
    per_device = batch_size // device_count
    if size == 0 or size in group_sizes(batch_size, device_count):
        return
    fits = [g for g in group_sizes(batch_size, device_count) if g >= min(8, per_device)]
    raise ConfigError(
        f"{key}: groups of {size} straddle the {per_device} images of each of {device_count} "
        f"devices (batch_size {batch_size}); use 0 (the whole batch) or one of "
        f"{', '.join(map(str, fits))}"
    )


def validate(c: ml_collections.ConfigDict, device_count: int) -> None:
    """Raises ConfigError naming the field and the fix; called before anything is compiled."""
    from convmixer_jax.model import registry
    from convmixer_jax.ops import ACTIVATIONS, policy

    try:
        spec = registry.get_spec(c.model.name)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    named = [t for t in c.targets.split(",") if t]
    _require(
        not c.target or c.target in named,
        f"target: this config is laid out for {', '.join(named) or 'no named target'}, not "
        f"{c.target!r}; pass one of those after the file name (FILE:TARGET) or none",
    )
    _require(c.dataset in DATASETS, f"dataset: {c.dataset!r} is unknown; use one of {DATASETS}")
    _require(
        c.dataset != "image_folder" or bool(c.data_dir),
        "data_dir: set it to the root of "
        "the image folder tree (ROOT/<split>/<class>/<image>) for dataset='image_folder'",
    )
    for key in ("width", "depth", "kernel_size", "patch_size", "num_classes"):
        _require(c.model[key] >= 0, f"model.{key}: must be >= 0 (0 uses the registered value)")
    _require(
        c.model.remat in policy.REMATS,
        f"model.remat: {c.model.remat!r} is unknown; use one of {list(policy.REMATS)}",
    )
    impls = (("depthwise_impl", policy.DEPTHWISE), ("pointwise_impl", policy.POINTWISE))
    for key, choices in impls:
        _require(
            c.model[key] in ("auto", *choices),
            f"model.{key}: {c.model[key]!r} is unknown; use auto or one of {choices}",
        )
    _require(
        not (c.model.remat == "dots" and c.model.pointwise_impl == "native"),
        "model.pointwise_impl: 'native' products are invisible to remat 'dots'; "
        "use model.remat='block' or pointwise_impl 'auto'",
    )
    act = c.model.activation
    _require(
        act in ("", *ACTIVATIONS),
        f"model.activation: {act!r} is unknown; use one of {list(ACTIVATIONS)}",
    )
    patch = c.model.patch_size or spec.patch_size
    _require(
        c.image_size > 0 and c.image_size % patch == 0,
        f"image_size: {c.image_size} is not a multiple of the patch size {patch}; "
        f"use e.g. {max(patch, c.image_size // patch * patch)}",
    )
    for key in ("batch_size", "eval_batch_size"):
        size = c[key] or c.batch_size
        _require(
            size > 0 and size % device_count == 0,
            f"{key}: {size} is not a positive multiple of the {device_count} devices; "
            f"use e.g. {max(1, size // device_count) * device_count}",
        )
    _require(c.num_train_steps >= 0, "num_train_steps: must be >= 0 (0 uses num_epochs)")
    _require(
        c.num_train_steps > 0 or c.num_epochs > 0,
        "num_epochs: must be > 0 when num_train_steps is 0",
    )
    _require(
        c.schedule in SCHEDULES, f"schedule: {c.schedule!r} is unknown; use one of {SCHEDULES}"
    )
    _require(c.dtype in DTYPES, f"dtype: {c.dtype!r} is unknown; use one of {DTYPES}")
    _require(0 < c.crop_pct <= 1, f"crop_pct: {c.crop_pct} must be in (0, 1]")
    _require(0 < c.crop_area_min <= 1, f"crop_area_min: {c.crop_area_min} must be in (0, 1]")
    _require(
        c.train_interpolation in TRAIN_INTERPOLATIONS,
        f"train_interpolation: {c.train_interpolation!r} is unknown; use {TRAIN_INTERPOLATIONS}",
    )
    if c.randaugment:
        try:
            parse_randaugment(c.randaugment)
        except ValueError as e:
            raise ConfigError(f"randaugment: {e}") from None
    _require(0 <= c.random_erase_prob <= 1, "random_erase_prob: must be in [0, 1]")
    _require(0 <= c.label_smoothing < 1, "label_smoothing: must be in [0, 1)")
    for key in ("mixup_alpha", "cutmix_alpha"):
        _require(c[key] >= 0, f"{key}: must be >= 0 (0 disables it)")
    _require(0 <= c.mixup_switch_prob <= 1, "mixup_switch_prob: must be in [0, 1]")
    for key in ("mixup_group_size", "bn_group_size"):
        _require(
            c[key] >= 0 and c.batch_size % max(c[key], 1) == 0,
            f"{key}: {c[key]} must be 0 (whole batch) or divide batch_size {c.batch_size}",
        )
        _check_group_layout(key, c[key], c.batch_size, device_count)
    for key in ("log_every_steps", "checkpoint_every_steps"):
        _require(c[key] > 0, f"{key}: must be > 0")
    _require(c.eval_every_steps >= 0, "eval_every_steps: must be >= 0 (0: only at the end)")
    _require(c.keep_checkpoints > 0, "keep_checkpoints: must be > 0")
    _require(c.sharding in SHARDINGS, f"sharding: {c.sharding!r} is unknown; use {SHARDINGS}")
    _require(c.nonfinite in NONFINITE, f"nonfinite: {c.nonfinite!r} is unknown; use {NONFINITE}")
    _require(
        c.bad_images in BAD_IMAGES, f"bad_images: {c.bad_images!r} is unknown; use {BAD_IMAGES}"
    )
    extra_eval_datasets(c)
