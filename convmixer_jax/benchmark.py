"""Benchmarks of the real train step and of the host input pipeline.

    python -m convmixer_jax.benchmark model --config configs/X.py [--batch_size N]
        [--image_size S] [--steps N] [--dtype bfloat16] [--peak_tflops P]
    python -m convmixer_jax.benchmark data --config configs/X.py [--batch_size N]
    python -m convmixer_jax.benchmark memory --config configs/X.py [--batch_sizes 16,32,64]
        [--remats none,block,dots] [--dtype bfloat16]

Each prints a table-like log and, as its last line, one JSON object. Timings exclude compilation
and warm-up, block on the outputs, and are the median of `--repeats` timed runs.
"""

from __future__ import annotations

import functools
import io
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from convmixer_jax import hostmem

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
flags.DEFINE_integer("batch_size", 0, "Global batch size (0: the config's).")
flags.DEFINE_integer("image_size", 0, "Image size (0: the config's).")
flags.DEFINE_integer("steps", 5, "Steps per timed run.")
flags.DEFINE_integer("repeats", 3, "Timed runs; the median is reported.")
flags.DEFINE_string("dtype", "", "Compute dtype (float32 or bfloat16; '': the config's).")
flags.DEFINE_float("peak_tflops", 0.0, "Peak dense TFLOP/s of one device (0: known table).")
flags.DEFINE_integer("num_images", 256, "data: distinct JPEGs to cycle through.")
flags.DEFINE_list("batch_sizes", ["16", "32", "64"], "memory: per-device batch sizes.")
flags.DEFINE_list("remats", ["none", "block", "dots"], "memory: model.remat settings.")
flags.mark_flags_as_required(["config"])

# Dense bf16 peak TFLOP/s per device, by jax's device_kind.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
}


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


def _peak_memory(compiled) -> int | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.temp_size_in_bytes
        + analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def benchmark_model(config, *, steps: int, repeats: int, peak_tflops: float = 0.0) -> dict:
    """Times the jitted, sharded train step and the eval forward pass on all devices."""
    run = prepare_model(config)
    seconds = interleaved_seconds(
        {"train": run["train_once"], "infer": run["infer_once"]}, steps, repeats
    )
    return model_figures(config, run, seconds["train"], seconds["infer"], peak_tflops)


def _train_parts(config):
    """The class count, a function making the initial train state, the model's graphdef and the
    train step (state, batch) -> (state, metrics) of `config`."""
    from convmixer_jax import models, optim
    from convmixer_jax import steps as steps_lib

    num_classes = models.config_architecture(config.model)["num_classes"]
    tx = optim.create_optimizer(config, optim.onecycle_schedule(config.learning_rate, 1000))

    def init():
        model = models.from_config(config, num_classes, config.seed)
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        return steps_lib.init_train_state(params, batch_stats, tx)

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.from_config(config, num_classes, 0)))
    train_step = functools.partial(
        steps_lib.train_step, graphdef=graphdef, tx=tx, label_smoothing=config.label_smoothing
    )
    return num_classes, init, graphdef, train_step


def prepare_model(config) -> dict:
    """The compiled, warmed-up train step and eval forward on all devices, as `train_once` and
    `infer_once` (each runs one batch), with `compile_seconds` and `peak_memory_bytes` of the
    train step."""
    from convmixer_jax import sharding

    num_classes, init, graphdef, train_step = _train_parts(config)
    mesh = sharding.create_mesh()
    state_sharding = sharding.state_sharding(mesh, jax.eval_shape(init), config.sharding)
    state = jax.jit(init, out_shardings=state_sharding)()

    size, batch_size = config.image_size, config.batch_size
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
        },
        sharding.batch_sharded(mesh),
    )
    step_fn = jax.jit(
        train_step,
        in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start

    holder = {"state": state}

    def train_once():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    def forward(params, batch_stats, images):
        return nnx.merge(graphdef, params, batch_stats)(images, train=False)

    infer = jax.jit(forward).lower(state["params"], state["batch_stats"], batch["image"]).compile()

    def infer_once():
        s = holder["state"]
        return infer(s["params"], s["batch_stats"], batch["image"])

    for fn in (train_once, infer_once):  # warm-up
        jax.block_until_ready(fn())
    return {
        "train_once": train_once,
        "infer_once": infer_once,
        "compile_seconds": compile_seconds,
        "peak_memory_bytes": _peak_memory(compiled),
    }


def train_tflops_per_sec(flops_per_image: float, images_per_sec: float, devices: int = 1) -> float:
    """TFLOP/s per device of training at this rate: forward and backward, 3x the forward FLOPs."""
    return 3 * flops_per_image * images_per_sec / 1e12 / devices


def model_figures(
    config, run: dict, train_seconds: float, infer_seconds: float, peak_tflops: float = 0.0
) -> dict:
    """The JSON record of `prepare_model`'s `run` at these seconds per batch; the implementations
    are those that ran ('auto' resolved)."""
    from convmixer_jax import depthwise, models, pointwise

    arch = models.config_architecture(config.model)
    num_classes, size, batch_size = arch["num_classes"], config.image_size, config.batch_size
    flops = models.forward_flops(
        **{k: arch[k] for k in ("width", "depth", "kernel_size", "patch_size")},
        num_classes=num_classes,
        image_size=size,
    )
    train_ips = batch_size / train_seconds
    train_tflops = train_tflops_per_sec(flops, train_ips, jax.device_count())
    device_kind = jax.devices()[0].device_kind
    peak = peak_tflops or PEAK_TFLOPS.get(device_kind)
    return {
        "model": config.model.name,
        "batch_size": batch_size,
        "image_size": size,
        "dtype": config.dtype,
        "depthwise_impl": depthwise.resolve_impl(config.model.depthwise_impl),
        "pointwise_impl": pointwise.resolve_impl(
            models.pointwise_impl_under_remat(config.model.pointwise_impl, config.model.remat),
            jnp.dtype(config.dtype),
        ),
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


def train_step_memory(config, per_device_batch: int) -> int | None:
    """Peak bytes of one device's train step (XLA's memory analysis), compiled, never run."""
    config.bn_group_size = 0  # per-group statistics need no more memory; groups may not divide
    _, init, _, train_step = _train_parts(config)
    size = config.image_size
    batch = {
        "image": jax.ShapeDtypeStruct((per_device_batch, size, size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((per_device_batch,), jnp.int32),
    }
    lowered = jax.jit(train_step, donate_argnums=0).lower(jax.eval_shape(init), batch)
    return _peak_memory(lowered.compile())


def benchmark_memory(config, batch_sizes: list[int], remats: list[str]) -> dict:
    """{remat: {per-device batch: peak GiB}} for the train step."""
    table = {}
    for remat in remats:
        config.model.remat = remat
        table[remat] = {
            b: round(train_step_memory(config, b) / 2**30, 2) for b in batch_sizes
        }  # fmt: skip
    return {"model": config.model.name, "dtype": config.dtype, "image_size": config.image_size,
            "device_kind": jax.devices()[0].device_kind, "peak_gib": table}  # fmt: skip


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


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in ("model", "data", "memory"):
        raise app.UsageError(
            "usage: python -m convmixer_jax.benchmark model|data|memory --config FILE"
        )
    config = FLAGS.config
    if FLAGS.batch_size:
        config.batch_size = FLAGS.batch_size
    if FLAGS.image_size:
        config.image_size = FLAGS.image_size
    if FLAGS.dtype:
        config.dtype = FLAGS.dtype
    if argv[1] == "model":
        result = benchmark_model(
            config, steps=FLAGS.steps, repeats=FLAGS.repeats, peak_tflops=FLAGS.peak_tflops
        )
    elif argv[1] == "memory":
        batch_sizes = [int(b) for b in FLAGS.batch_sizes]
        result = benchmark_memory(config, batch_sizes, FLAGS.remats)
    else:
        result = benchmark_data(
            config, num_images=FLAGS.num_images, steps=FLAGS.steps, repeats=FLAGS.repeats
        )
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    hostmem.reexec_tuned()
    app.run(main)
