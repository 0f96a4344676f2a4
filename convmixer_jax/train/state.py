"""The training state, its shardings and the jitted train and eval steps, built from a config.

One builder for everything that compiles a step: the train loop, the benchmarks and the
ahead-of-time compiles for TPUs and GPUs (`aot.py`) all get the same functions, shardings, mixing
and groups from here. It imports no TensorFlow, so it runs where only JAX is installed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from convmixer_jax import ops
from convmixer_jax.model import registry
from convmixer_jax.train import mixing, optim, sharding, steps


@dataclasses.dataclass(frozen=True)
class Setup:
    """The model and optimizer of a config, abstract (nothing allocated) and sharded on `mesh`."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    num_classes: int
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    impls: ops.Impls  # the implementations the model runs on the mesh's devices
    abstract_state: steps.TrainState
    state_sharding: Any


def create(
    config: ml_collections.ConfigDict,
    num_classes: int,
    total_steps: int,
    steps_per_epoch: float,
    mesh: jax.sharding.Mesh | None = None,
) -> Setup:
    """The setup of `config` for a run of `total_steps` on `mesh` (default: every device)."""
    mesh = mesh or sharding.create_mesh()
    schedule = optim.create_schedule(config, total_steps, steps_per_epoch)
    tx = optim.create_optimizer(config, schedule)
    devices = list(mesh.devices.flat)
    model = nnx.eval_shape(lambda: registry.from_config(config, num_classes, 0, devices))
    abstract_state = jax.eval_shape(functools.partial(_init, config, tx, num_classes, devices))
    state_sharding = sharding.state_sharding(mesh, abstract_state, config.sharding)
    return Setup(
        config, mesh, num_classes, schedule, tx, nnx.graphdef(model), model.impls,
        abstract_state, state_sharding,
    )  # fmt: skip


def _init(config, tx, num_classes: int, devices) -> steps.TrainState:
    model = registry.from_config(config, num_classes, config.seed, devices)
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return steps.init_train_state(params, batch_stats, tx)


def initial_state(setup: Setup) -> steps.TrainState:
    """Freshly initialised training state, created directly with its sharding."""
    devices = list(setup.mesh.devices.flat)
    init = functools.partial(_init, setup.config, setup.tx, setup.num_classes, devices)
    return jax.jit(init, out_shardings=setup.state_sharding)()


def train_step(setup: Setup):
    """The jitted train step (state, batch) -> (state, metrics): state donated, batch sharded."""
    config = setup.config
    step = functools.partial(
        steps.train_step,
        graphdef=setup.graphdef,
        tx=setup.tx,
        label_smoothing=config.label_smoothing,
        mixing=mixing.from_config(config, setup.num_classes),
        seed=config.seed,
    )
    return jax.jit(
        step,
        in_shardings=(setup.state_sharding, sharding.batch_sharded(setup.mesh)),
        out_shardings=(setup.state_sharding, sharding.replicated(setup.mesh)),
        donate_argnums=0,
    )


def eval_step(setup: Setup):
    """The jitted eval step (params, batch_stats, batch) -> sums of top-1, top-5, loss, count."""
    return jax.jit(
        functools.partial(steps.eval_step, graphdef=setup.graphdef),
        in_shardings=(
            setup.state_sharding["params"],
            setup.state_sharding["batch_stats"],
            sharding.batch_sharded(setup.mesh),
        ),
        out_shardings=sharding.replicated(setup.mesh),
    )


def batch_shapes(config: ml_collections.ConfigDict, batch_size: int, train: bool = True) -> dict:
    """Shapes and dtypes of a global batch as the input pipeline delivers it."""
    size = config.image_size
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), transfer_dtype(config)),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    if not train:
        batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return batch


def transfer_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """The dtype images cross from host to device in: the compute dtype, since the model's first
    step casts them to it anyway (bfloat16 halves the bytes against float32)."""
    return jnp.dtype(config.dtype)
