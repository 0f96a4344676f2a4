"""Learning-rate schedules and the optimizer: global-norm clipping -> AdamW, as an optax chain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def onecycle_schedule(peak: float, total_steps: int) -> optax.Schedule:
    """The authors' "one-cycle": piecewise linear (0, 0) -> (0.4T, lr) -> (0.8T, lr/20) -> (T, 0).

    Written with `jnp.interp` because the knots fall between steps (the authors interpolate in
    fractional epochs); optax's joined linear schedules would round them to whole steps.
    """
    knots = jnp.array([0.0, 0.4, 0.8, 1.0]) * total_steps
    values = jnp.array([0.0, peak, peak / 20, 0.0])
    return lambda step: jnp.interp(step, knots, values)


def cosine_schedule(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup to `peak`, then cosine decay to 0 at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0
    )


def create_schedule(
    config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: float
) -> optax.Schedule:
    if config.schedule == "onecycle":
        return onecycle_schedule(config.learning_rate, total_steps)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return cosine_schedule(config.learning_rate, total_steps, warmup)


def decay_mask(params):
    """Weight decay only on >= 2-D parameters: no decay on biases and BatchNorm scale/offset."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    adamw = optax.adamw(
        schedule,
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        mask=None if config.weight_decay_all else decay_mask,
    )
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw
