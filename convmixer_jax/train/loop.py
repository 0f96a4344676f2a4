"""Training and evaluation loops: mesh, state, data, jitted steps, checkpoints and metrics."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from convmixer_jax.data import datasets, input_pipeline
from convmixer_jax.train import checkpointing, preemption, sharding, steps
from convmixer_jax.train import config as config_lib
from convmixer_jax.train import state as state_lib
from convmixer_jax.train.metrics import create_writer
from convmixer_jax.weights import pretrained


@dataclasses.dataclass
class Experiment:
    """Everything derived from a config before the first compilation."""

    config: ml_collections.ConfigDict
    setup: state_lib.Setup  # model, optimizer, mesh and shardings
    builder: Any
    total_steps: int
    # config.extra_eval_datasets' builders by metric prefix, e.g. {'eval_imagenet_v2': ...}.
    extra_eval: dict[str, Any] = dataclasses.field(default_factory=dict)


def setup(config: ml_collections.ConfigDict) -> Experiment:
    """Validates the config, finds the data and builds the (abstract) model and optimizer."""
    config_lib.validate(config, jax.device_count())
    builder = datasets.get_builder(config)
    if config.train_split not in builder.info.splits:
        raise datasets.DataError(
            f"train_split {config.train_split!r} is not in {list(builder.info.splits)}; set it"
        )
    num_classes = config.model.num_classes or datasets.num_classes(builder)
    extra_eval = {
        prefix: datasets.extra_eval_builder(name, config, num_classes)
        for prefix, name in config_lib.extra_eval_datasets(config).items()
    }
    train_examples = builder.info.splits[config.train_split].num_examples
    steps_per_epoch = train_examples / config.batch_size
    total_steps = config.num_train_steps or max(1, math.ceil(config.num_epochs * steps_per_epoch))
    setup = state_lib.create(config, num_classes, total_steps, steps_per_epoch)
    return Experiment(config, setup, builder, total_steps, extra_eval)


def initial_state(exp: Experiment) -> steps.TrainState:
    """Freshly initialised training state (or the weights of config.init_from), sharded."""
    state = state_lib.initial_state(exp.setup)
    return pretrained.init_from(exp.config.init_from, state) if exp.config.init_from else state


def compile_steps(exp: Experiment):
    """The jitted train step (state donated) and eval step, with explicit shardings."""
    return state_lib.train_step(exp.setup), state_lib.eval_step(exp.setup)


def run_eval(exp: Experiment, eval_fn, state, eval_data, prefix: str = "eval") -> dict[str, float]:
    """Exact top-1/top-5/loss over the whole eval split (padding masked out), named PREFIX/...

    `eval_data` is (dataset, number of examples in the split); examples whose image could not
    be decoded are reported as PREFIX/skipped_images. Datasets with ReaL labels add
    PREFIX/real_top1 and PREFIX/real_images (the images with a non-empty label set).
    """
    eval_ds, expected = eval_data
    totals: dict[str, float] = {}
    for local in input_pipeline.as_numpy(eval_ds):
        sums = eval_fn(
            state["params"], state["batch_stats"], sharding.global_batch(exp.setup.mesh, local)
        )
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.get("count", 0.0)
    if count <= 0:
        hint = "set eval_split to a split with data" if prefix == "eval" else "prepare it again"
        raise datasets.DataError(f"the {prefix} split is empty; {hint}")
    metrics = {f"{prefix}/{k}": totals[k] / count for k in ("top1", "top5", "loss")}
    if totals.get("real_count", 0.0) > 0:
        metrics[f"{prefix}/real_top1"] = totals["real_top1"] / totals["real_count"]
        metrics[f"{prefix}/real_images"] = totals["real_count"]
    if count < expected:
        logging.warning("%s skipped %d undecodable images.", prefix, expected - count)
        metrics[f"{prefix}/skipped_images"] = expected - count
    return metrics


def _eval_data(exp: Experiment, builder=None, split: str = "") -> tuple[Any, int]:
    """The eval dataset of this process and the number of examples in the whole split
    (by default the main dataset's eval split)."""
    builder = builder or exp.builder
    split = split or datasets.eval_split(builder, exp.config)
    local_batch = (exp.config.eval_batch_size or exp.config.batch_size) // jax.process_count()
    ds = input_pipeline.eval_dataset(builder, exp.config, split, local_batch=local_batch)
    return ds, builder.info.splits[split].num_examples


def _eval_sets(exp: Experiment) -> list[tuple[str, tuple[Any, int]]]:
    """(metric prefix, eval data) of the main eval split and of every extra eval dataset."""
    sets = [("eval", _eval_data(exp))]
    for prefix, builder in exp.extra_eval.items():
        sets.append((prefix, _eval_data(exp, builder, datasets.default_eval_split(builder))))
    return sets


def _run_evals(exp: Experiment, eval_fn, state, eval_sets) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for prefix, eval_data in eval_sets:
        metrics.update(run_eval(exp, eval_fn, state, eval_data, prefix))
    return metrics


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with nonfinite='stop'; the bad update was not applied."""


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Creates the workdir and writes config.json (process 0), or says why it cannot."""
    try:
        path = epath.Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            (path / "config.json").write_text(config.to_json_best_effort(indent=2))
    except OSError as e:
        raise config_lib.ConfigError(
            f"workdir: cannot write to {workdir!r} ({e.strerror or e}); pass a writable --workdir"
        ) from None


def _restore_target(exp: Experiment):
    """The abstract train state with its shardings, as checkpoints are restored into."""
    return checkpointing.abstract_with_sharding(exp.setup.abstract_state, exp.setup.state_sharding)


def _restore_or_init(exp: Experiment, manager) -> steps.TrainState:
    target = _restore_target(exp)
    state, step = checkpointing.restore_newest(manager, target, move_aside=True)
    if state is None:
        return initial_state(exp)
    logging.info("Resumed from %s at step %d.", manager.directory, step)
    return state


def _check_finite(config: ml_collections.ConfigDict, rows: list[dict], first_step: int) -> None:
    if config.nonfinite != "stop":
        return
    for i, row in enumerate(rows):
        if row["nonfinite"]:
            raise NonFiniteError(
                f"non-finite loss or gradients at step {first_step + i}; the update was not "
                "applied and no checkpoint was written after it. Lower learning_rate or check "
                "the data, or set nonfinite='skip' to skip such steps"
            )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from DIR/checkpoints if present), evaluates, returns final eval metrics.

    Raises preemption.Preempted after saving a checkpoint when the run is preempted.
    """
    exp = setup(config)
    _prepare_workdir(config, workdir)
    manager = checkpointing.create_manager(
        epath.Path(workdir) / "checkpoints", config.keep_checkpoints
    )
    state = _restore_or_init(exp, manager)
    step = int(state["step"])
    if step >= exp.total_steps:
        logging.info("Run already finished: step %d of %d. Nothing to do.", step, exp.total_steps)
        manager.close()
        return {}

    train_fn, eval_fn = compile_steps(exp)
    writer = create_writer(workdir)
    local_batch = config.batch_size // jax.process_count()
    skipped_images = input_pipeline.counter()
    train_ds = input_pipeline.train_dataset(
        exp.builder, config, local_batch=local_batch, start_step=step, skipped=skipped_images
    )
    train_iter = sharding.prefetch(exp.setup.mesh, input_pipeline.as_numpy(train_ds))
    eval_ds = _eval_sets(exp)

    with preemption.Guard() as guard:
        try:
            return _train_loop(
                exp, state, train_fn, eval_fn, train_iter, eval_ds, skipped_images, manager,
                writer, guard,
            )  # fmt: skip
        finally:  # whatever ends the loop, the newest checkpoint is completed, never half-written
            manager.wait_until_finished()
            manager.close()
            writer.flush()


def _train_loop(
    exp, state, train_fn, eval_fn, train_iter, eval_ds, skipped_images, manager, writer, guard
) -> dict[str, float]:
    """Steps until the end (returns the final eval metrics) or a preemption (raises)."""
    config, step = exp.config, int(state["step"])
    pending: list[dict[str, jax.Array]] = []  # metrics not yet fetched from the devices
    interval: list[dict[str, np.ndarray]] = []  # fetched metrics since the last log line
    timer_start, timer_step = None, step
    eval_metrics: dict[str, float] = {}
    while step < exp.total_steps:
        state, metrics = train_fn(state, next(train_iter))
        step += 1
        pending.append(metrics)
        if timer_start is None:  # exclude compilation from the throughput
            jax.block_until_ready(metrics)
            timer_start, timer_step = time.perf_counter(), step
        last = step == exp.total_steps
        log_now = last or step % config.log_every_steps == 0
        eval_now = last or (config.eval_every_steps and step % config.eval_every_steps == 0)
        preempted = guard.reached(manager, step)
        save_now = last or preempted or step % config.checkpoint_every_steps == 0
        if log_now or eval_now or save_now:
            rows = jax.device_get(pending)
            _check_finite(config, rows, step - len(rows) + 1)
            interval += rows
            pending = []
        if log_now:
            rate = (step - timer_step) / (time.perf_counter() - timer_start)
            skipped = {
                "train/skipped_steps": int(state["skipped_steps"]),
                "train/skipped_images": int(skipped_images.numpy()),
            }
            _log_train(writer, exp, step, interval, rate, skipped)
            interval = []
        if eval_now:
            eval_metrics = _run_evals(exp, eval_fn, state, eval_ds)
            writer.write_scalars(step, eval_metrics)
            logging.info("eval at step %d: %s", step, _fmt(eval_metrics))
        if save_now:
            checkpointing.save(manager, step, state)
        if preempted:
            raise preemption.Preempted(step)
    return eval_metrics


def _log_train(writer, exp: Experiment, step: int, rows, steps_per_sec: float, skipped: dict):
    scalars = {
        f"train/{k}": float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "nonfinite"
    }
    scalars["train/lr"] = float(exp.setup.schedule(step - 1))
    scalars["train/images_per_sec"] = steps_per_sec * exp.config.batch_size
    scalars.update(skipped)
    writer.write_scalars(step, scalars)
    eta = (exp.total_steps - step) / steps_per_sec if steps_per_sec > 0 else 0.0
    logging.info(
        "step %d/%d  loss %.4f  lr %.3g  %.1f img/s  ETA %s%s",
        step,
        exp.total_steps,
        scalars["train/loss"],
        scalars["train/lr"],
        scalars["train/images_per_sec"],
        _format_seconds(eta),
        "".join(f"  {k.split('/')[1].replace('_', ' ')} {v}" for k, v in skipped.items() if v),
    )


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Restores the newest checkpoint of `workdir` (or config.checkpoint) and evaluates it."""
    exp = setup(config)
    directory, step = checkpointing.resolve(config.checkpoint or workdir)
    manager = checkpointing.create_manager(directory, read_only=True)
    target = _restore_target(exp)
    if step is None:
        state, step = checkpointing.restore_newest(
            manager, target, model_only=True, move_aside=False
        )
    else:
        state = checkpointing.restore_step(manager, step, target, model_only=True)
    manager.close()
    if state is None:
        raise checkpointing.CheckpointError(
            f"no checkpoint in {str(directory)!r}; train first or pass --config.checkpoint=PATH"
        )
    _prepare_workdir(config, workdir)
    _, eval_fn = compile_steps(exp)
    metrics = _run_evals(exp, eval_fn, state, _eval_sets(exp))
    writer = create_writer(workdir)
    writer.write_scalars(step, metrics)
    writer.flush()
    logging.info("eval of step %d from %s: %s", step, directory, _fmt(metrics))
    return metrics


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
