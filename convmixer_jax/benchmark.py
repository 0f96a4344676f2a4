"""Benchmarks of the real train step and of the host input pipeline.

    python -m convmixer_jax.benchmark model --config configs/X.py [--batch_size N]
        [--image_size S] [--steps N] [--dtype bfloat16] [--peak_tflops P]
    python -m convmixer_jax.benchmark data --config configs/X.py [--batch_size N]
    python -m convmixer_jax.benchmark aot --config configs/X.py[:TARGET] [--target TARGET]
        [--per_device_batch N] [--remat none|block|dots] [--dtype bfloat16]

Each prints a table-like log and, as its last line, one JSON object. Timings exclude compilation
and warm-up, block on the outputs, and are the median of `--repeats` timed runs. `aot` compiles
for a TPU or GPU target without the hardware (`aot/compile.py`) and runs nothing.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from convmixer_jax.aot import targets
from convmixer_jax.aot.compile import CompilerMissing, peak_bytes
from convmixer_jax.runtime import hostmem
from convmixer_jax.train import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
flags.DEFINE_integer("batch_size", 0, "Global batch size (0: the config's).")
flags.DEFINE_integer("image_size", 0, "Image size (0: the config's).")
flags.DEFINE_integer("steps", 5, "Steps per timed run.")
flags.DEFINE_integer("repeats", 3, "Timed runs; the median is reported.")
flags.DEFINE_string("dtype", "", "Compute dtype (float32 or bfloat16; '': the config's).")
flags.DEFINE_float("peak_tflops", 0.0, "Peak dense TFLOP/s of one device (0: known table).")
flags.DEFINE_integer("num_images", 256, "data: distinct JPEGs to cycle through.")
flags.DEFINE_string("target", "", "aot: a target of targets.py or 'cpu' ('': the config's).")
flags.DEFINE_integer("per_device_batch", 0, "aot: images per device (0: the config's batch).")
flags.DEFINE_string("remat", "", "aot: model.remat ('': the config's).")
flags.mark_flags_as_required(["config"])


def median_seconds(fn, steps: int, repeats: int) -> float:
    """Median over `repeats` of the wall time per call of `steps` calls of fn (outputs blocked
    on)."""
    return interleaved_seconds({"fn": fn}, steps, repeats)["fn"]


def interleaved_seconds(fns: dict, steps: int, repeats: int) -> dict:
    """Per name, the median over `repeats` rounds of the wall time per call of `steps` calls of
    that fn (outputs blocked on: jax arrays or anything else). Each round runs every fn in turn,
    so a slow spell of a shared machine falls on all of them rather than on one."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def benchmark_model(config, *, steps: int, repeats: int, peak_tflops: float = 0.0) -> dict:
    """Times the jitted, sharded train step and the eval forward pass on all devices."""
    config_lib.validate(config, jax.device_count())
    run = prepare_model(config)
    seconds = interleaved_seconds(
        {"train": run["train_once"], "infer": run["infer_once"]}, steps, repeats
    )
    return model_figures(config, run, seconds["train"], seconds["infer"], peak_tflops)


def _setup(config, mesh=None):
    """The train setup of `config` (a 1000-step schedule) with its class count from the model."""
    from convmixer_jax.model import registry
    from convmixer_jax.train import state

    num_classes = registry.config_architecture(config.model)["num_classes"]
    return state.create(config, num_classes, 1000, 1000.0, mesh)


def prepare_model(config) -> dict:
    """The compiled, warmed-up train step and eval forward on all devices, as `train_once` and
    `infer_once` (each runs one batch), with `compile_seconds` and `peak_memory_bytes` of the
    train step."""
    from convmixer_jax.model import inference
    from convmixer_jax.train import sharding, state

    setup = _setup(config)
    train_state = state.initial_state(setup)
    rng = np.random.default_rng(0)
    shapes = state.batch_shapes(config, config.batch_size)
    batch = jax.device_put(
        {
            "image": rng.normal(size=shapes["image"].shape).astype(shapes["image"].dtype),
            "label": rng.integers(0, setup.num_classes, config.batch_size).astype(np.int32),
        },
        sharding.batch_sharded(setup.mesh),
    )
    start = time.perf_counter()
    compiled = state.train_step(setup).lower(train_state, batch).compile()
    compile_seconds = time.perf_counter() - start

    holder = {"state": train_state}

    def train_once():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    def forward(params, batch_stats, images):
        return inference.reparameterize(nnx.merge(setup.graphdef, params, batch_stats))(images)

    infer = (
        jax.jit(forward)
        .lower(train_state["params"], train_state["batch_stats"], batch["image"])
        .compile()
    )

    def infer_once():
        s = holder["state"]
        return infer(s["params"], s["batch_stats"], batch["image"])

    for fn in (train_once, infer_once):  # warm-up
        jax.block_until_ready(fn())
    return {
        "train_once": train_once,
        "infer_once": infer_once,
        "compile_seconds": compile_seconds,
        "peak_memory_bytes": peak_bytes(compiled),
        "impls": setup.impls,
    }


def train_tflops_per_sec(flops_per_image: float, images_per_sec: float, devices: int = 1) -> float:
    """TFLOP/s per device of training at this rate: forward and backward, 3x the forward FLOPs."""
    return 3 * flops_per_image * images_per_sec / 1e12 / devices


def model_figures(
    config, run: dict, train_seconds: float, infer_seconds: float, peak_tflops: float = 0.0
) -> dict:
    """The JSON record of `prepare_model`'s `run` at these seconds per batch; the implementations
    are those that ran ('auto' resolved)."""
    from convmixer_jax.model import flops as flops_lib
    from convmixer_jax.model import registry

    arch = registry.config_architecture(config.model)
    num_classes, size, batch_size = arch["num_classes"], config.image_size, config.batch_size
    flops = flops_lib.forward_flops(
        **{k: arch[k] for k in ("width", "depth", "kernel_size", "patch_size")},
        num_classes=num_classes,
        image_size=size,
    )
    train_ips = batch_size / train_seconds
    train_tflops = train_tflops_per_sec(flops, train_ips, jax.device_count())
    device_kind = jax.devices()[0].device_kind
    peak = peak_tflops or targets.PEAK_TFLOPS.get(device_kind)
    return {
        "model": config.model.name,
        "batch_size": batch_size,
        "image_size": size,
        "dtype": config.dtype,
        "depthwise_impl": run["impls"].depthwise,
        "pointwise_impl": run["impls"].pointwise,
        "train_images_per_sec": train_ips,
        "infer_images_per_sec": batch_size / infer_seconds,
        "model_flops_per_image": flops,
        "train_tflops_per_sec": train_tflops,
        "mfu": train_tflops / peak if peak else None,
        "peak_tflops": peak,
        "compile_seconds": run["compile_seconds"],
        "peak_memory_bytes": run["peak_memory_bytes"],
        "device_kind": device_kind,
        "device_count": jax.device_count(),
        "malloc": hostmem.mode(),
    }


def _synthetic_jpegs(n: int, rng: np.random.Generator) -> list[bytes]:
    """ImageNet-like JPEGs (~500x375, smooth content with edges, so typical file sizes)."""
    from PIL import Image

    out = []
    for _ in range(n):
        h, w = int(rng.integers(333, 420)), int(rng.integers(450, 520))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(f * xx + g * yy + p) for f, g, p in rng.uniform(1, 12, (3, 3))])
        image = (base.transpose(1, 2, 0) * 80 + 128).clip(0, 255)
        for _ in range(6):
            y0, x0 = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
            image[y0 : y0 + int(rng.integers(20, 160)), x0 : x0 + int(rng.integers(20, 160))] = (
                rng.uniform(0, 255, 3)
            )
        image += rng.normal(0, 6, image.shape)
        buf = io.BytesIO()
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def benchmark_data(config, *, num_images: int, steps: int, repeats: int) -> dict:
    """Times the full host train pipeline (decode, augment, batch) on in-memory JPEGs."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")

    from convmixer_jax.data import input_pipeline

    rng = np.random.default_rng(0)
    jpegs = _synthetic_jpegs(num_images, rng)
    records = tf.data.Dataset.from_tensor_slices(
        (jpegs, rng.integers(0, 1000, num_images).astype(np.int32), [""] * num_images)
    )
    split = input_pipeline.ProcessSplit(records.cache(), num_images, num_images)
    ds = input_pipeline.train_batches(split, num_images, config, local_batch=config.batch_size)
    batches = iter(ds)
    next(batches)  # warm-up: fills the caches and the prefetch buffers

    def one_batch():
        return next(batches)["image"]

    seconds = median_seconds(lambda: one_batch().numpy(), steps, repeats)
    cores = len(os.sched_getaffinity(0))
    ips = config.batch_size / seconds
    return {
        "images_per_sec": ips,
        "images_per_sec_per_core": ips / cores,
        "cores": cores,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "mean_jpeg_bytes": int(np.mean([len(j) for j in jpegs])),
    }


def benchmark_aot(config) -> dict:
    """`aot.figures` of `config` for --target (or the config's own `target`)."""
    from convmixer_jax.aot import compile as aot

    name = FLAGS.target or config.get("target", "")
    if not name:
        raise config_lib.ConfigError(
            "target: pass --target NAME, or a config with one (--config FILE:TARGET)"
        )
    target = aot.resolve(name)
    aot.prepare(target)
    devs = aot.devices(target)
    if FLAGS.per_device_batch:
        config.batch_size = FLAGS.per_device_batch * len(devs)
        config.eval_batch_size = 0
    if FLAGS.remat:
        config.model.remat = FLAGS.remat
    return aot.figures(config, target, devs)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in ("model", "data", "aot"):
        raise app.UsageError("usage: python -m convmixer_jax.benchmark model|data|aot --config F")
    config = FLAGS.config
    if FLAGS.batch_size:
        config.batch_size = FLAGS.batch_size
    if FLAGS.image_size:
        config.image_size = FLAGS.image_size
    if FLAGS.dtype:
        config.dtype = FLAGS.dtype
    try:
        if argv[1] == "model":
            result = benchmark_model(
                config, steps=FLAGS.steps, repeats=FLAGS.repeats, peak_tflops=FLAGS.peak_tflops
            )
        elif argv[1] == "aot":
            result = benchmark_aot(config)
        else:
            result = benchmark_data(
                config, num_images=FLAGS.num_images, steps=FLAGS.steps, repeats=FLAGS.repeats
            )
    except (config_lib.ConfigError, CompilerMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for key, value in result.items():
        print(f"{key:>30}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    hostmem.reexec_tuned()
    app.run(main)
