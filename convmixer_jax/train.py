"""Training and evaluation loops: mesh, state, data, jitted steps, checkpoints and metrics."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from convmixer_jax import checkpointing, models, optim, sharding, steps
from convmixer_jax import config as config_lib
from convmixer_jax.data import datasets, input_pipeline
from convmixer_jax.metrics import create_writer


@dataclasses.dataclass
class Experiment:
    """Everything derived from a config before the first compilation."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    builder: Any
    num_classes: int
    total_steps: int
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    abstract_state: steps.TrainState
    state_sharding: Any


def build_model(config: ml_collections.ConfigDict, num_classes: int, seed: int) -> models.ConvMixer:
    m = config.model
    return models.create_model(
        m.name,
        num_classes=num_classes,
        rngs=nnx.Rngs(seed),
        dtype=jnp.dtype(config.dtype),
        depthwise_impl=m.depthwise_impl,
        width=m.width,
        depth=m.depth,
        kernel_size=m.kernel_size,
        patch_size=m.patch_size,
        activation=m.activation,
    )


def setup(config: ml_collections.ConfigDict) -> Experiment:
    """Validates the config, finds the data and builds the (abstract) model and optimizer."""
    config_lib.validate(config, jax.device_count())
    builder = datasets.get_builder(config)
    if config.train_split not in builder.info.splits:
        raise datasets.DataError(
            f"train_split {config.train_split!r} is not in {list(builder.info.splits)}; set it"
        )
    num_classes = config.model.num_classes or datasets.num_classes(builder)
    train_examples = builder.info.splits[config.train_split].num_examples
    steps_per_epoch = train_examples / config.batch_size
    total_steps = config.num_train_steps or max(1, math.ceil(config.num_epochs * steps_per_epoch))
    schedule = optim.create_schedule(config, total_steps, steps_per_epoch)
    tx = optim.create_optimizer(config, schedule)
    mesh = sharding.create_mesh()

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(config, num_classes, 0)))
    abstract_state = jax.eval_shape(
        functools.partial(_init_state, config, tx, num_classes, config.seed)
    )
    state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_state)
    return Experiment(
        config,
        mesh,
        builder,
        num_classes,
        total_steps,
        schedule,
        tx,
        graphdef,
        abstract_state,
        state_sharding,
    )


def _init_state(config, tx, num_classes: int, seed: int) -> steps.TrainState:
    model = build_model(config, num_classes, seed)
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
    }


def initial_state(exp: Experiment) -> steps.TrainState:
    """Freshly initialised training state, created directly with its (replicated) sharding."""
    init = functools.partial(_init_state, exp.config, exp.tx, exp.num_classes, exp.config.seed)
    return jax.jit(init, out_shardings=exp.state_sharding)()


def compile_steps(exp: Experiment):
    """The jitted train step (state donated) and eval step, with explicit shardings."""
    batch = sharding.batch_sharded(exp.mesh)
    repl = sharding.replicated(exp.mesh)
    train = jax.jit(
        functools.partial(
            steps.train_step,
            graphdef=exp.graphdef,
            tx=exp.tx,
            label_smoothing=exp.config.label_smoothing,
        ),
        in_shardings=(exp.state_sharding, batch),
        out_shardings=(exp.state_sharding, repl),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(steps.eval_step, graphdef=exp.graphdef),
        in_shardings=(
            exp.state_sharding["params"],
            exp.state_sharding["batch_stats"],
            batch,
        ),
        out_shardings=repl,
    )
    return train, evaluate


def run_eval(exp: Experiment, eval_fn, state, eval_ds) -> dict[str, float]:
    """Exact top-1/top-5/loss over the whole eval split (padding masked out)."""
    totals: dict[str, float] = {}
    for local in input_pipeline.as_numpy(eval_ds):
        sums = eval_fn(
            state["params"], state["batch_stats"], sharding.global_batch(exp.mesh, local)
        )
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.get("count", 0.0)
    if count <= 0:
        raise datasets.DataError("the eval split is empty; set eval_split to a split with data")
    return {f"eval/{k}": totals[k] / count for k in ("top1", "top5", "loss")}


def _eval_data(exp: Experiment):
    split = datasets.eval_split(exp.builder, exp.config)
    local_batch = (exp.config.eval_batch_size or exp.config.batch_size) // jax.process_count()
    return input_pipeline.eval_dataset(exp.builder, exp.config, split, local_batch=local_batch)


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from DIR/checkpoints if present), evaluates, returns final eval metrics."""
    exp = setup(config)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    manager = checkpointing.create_manager(
        os.path.join(workdir, "checkpoints"), config.keep_checkpoints
    )
    latest = manager.latest_step()
    if latest is None:
        state = initial_state(exp)
    else:
        target = checkpointing.abstract_with_sharding(exp.abstract_state, exp.state_sharding)
        state = checkpointing.restore(manager, latest, target)
        logging.info("Resumed from %s at step %d.", manager.directory, latest)
    step = int(state["step"])
    if step >= exp.total_steps:
        logging.info("Run already finished: step %d of %d. Nothing to do.", step, exp.total_steps)
        manager.close()
        return {}

    train_fn, eval_fn = compile_steps(exp)
    writer = create_writer(workdir)
    local_batch = config.batch_size // jax.process_count()
    train_iter = input_pipeline.as_numpy(
        input_pipeline.train_dataset(exp.builder, config, local_batch=local_batch, start_step=step)
    )
    eval_ds = _eval_data(exp)

    pending: list[dict[str, jax.Array]] = []
    timer_start, timer_step = None, step
    eval_metrics: dict[str, float] = {}
    while step < exp.total_steps:
        batch = sharding.global_batch(exp.mesh, next(train_iter))
        state, metrics = train_fn(state, batch)
        step += 1
        pending.append(metrics)
        if timer_start is None:  # exclude compilation from the throughput
            jax.block_until_ready(metrics)
            timer_start, timer_step = time.perf_counter(), step
        last = step == exp.total_steps
        if step % config.log_every_steps == 0 or last:
            rows = jax.device_get(pending)
            pending = []
            elapsed = time.perf_counter() - timer_start
            rate = (step - timer_step) / elapsed if step > timer_step else float("nan")
            scalars = {f"train/{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]}
            scalars["train/lr"] = float(exp.schedule(step - 1))
            scalars["train/images_per_sec"] = rate * config.batch_size
            writer.write_scalars(step, scalars)
            eta = (exp.total_steps - step) / rate if rate == rate and rate > 0 else 0.0
            logging.info(
                "step %d/%d  loss %.4f  lr %.3g  %.1f img/s  ETA %s",
                step,
                exp.total_steps,
                scalars["train/loss"],
                scalars["train/lr"],
                scalars["train/images_per_sec"],
                _format_seconds(eta),
            )
        if last or (config.eval_every_steps and step % config.eval_every_steps == 0):
            eval_metrics = run_eval(exp, eval_fn, state, eval_ds)
            writer.write_scalars(step, eval_metrics)
            logging.info("eval at step %d: %s", step, _fmt(eval_metrics))
        if last or step % config.checkpoint_every_steps == 0:
            checkpointing.save(manager, step, state)
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    return eval_metrics


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Restores the newest checkpoint of `workdir` (or config.checkpoint) and evaluates it."""
    exp = setup(config)
    directory, step = checkpointing.resolve(config.checkpoint or workdir)
    manager = checkpointing.create_manager(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise checkpointing.CheckpointError(
            f"no checkpoint in {directory!r}; train first or pass --config.checkpoint=PATH"
        )
    target = checkpointing.abstract_with_sharding(exp.abstract_state, exp.state_sharding)
    state = checkpointing.restore(manager, step, target, model_only=True)
    manager.close()
    _, eval_fn = compile_steps(exp)
    eval_ds = _eval_data(exp)
    metrics = run_eval(exp, eval_fn, state, eval_ds)
    os.makedirs(workdir, exist_ok=True)
    writer = create_writer(workdir)
    writer.write_scalars(step, metrics)
    writer.flush()
    logging.info("eval of step %d from %s: %s", step, directory, _fmt(metrics))
    return metrics


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
