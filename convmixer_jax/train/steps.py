"""Pure, jit-able train and eval steps.

The training state is a plain dict pytree {'step', 'params', 'batch_stats', 'opt_state',
'skipped_steps'}; the model's structure (an NNX GraphDef) and the optimizer are static arguments.
BatchNorm statistics are computed over the whole batch the step sees, which under jit over a
batch-sharded global array is the global batch on every device (or over groups of it: the
model's bn_group_size).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from convmixer_jax.model import inference
from convmixer_jax.train import mixing as mixing_lib

TrainState = dict[str, Any]


def init_train_state(params, batch_stats, tx: optax.GradientTransformation) -> TrainState:
    """The state at step 0 for the given model variables."""
    zero = jnp.zeros((), jnp.int32)
    return {
        "step": zero,
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "skipped_steps": zero,
    }


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets with label smoothing folded in (off value smoothing / num_classes)."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example soft-target cross-entropy, computed in float32."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    topk = jax.lax.top_k(logits, k)[1]
    return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    label_smoothing: float,
    mixing: mixing_lib.MixConfig | None = None,
    seed: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` ({'image': NHWC float, 'label': int}); returns new state.

    With `mixing`, the batch is mixed (Mixup/CutMix) with a key from `seed` and the step, so a
    resumed run mixes exactly as an uninterrupted one; top-1 is still against the true labels.
    """
    images, targets = batch["image"], None
    if mixing is not None:
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        images, targets = mixing_lib.mix_batch(
            key, images, batch["label"], label_smoothing=label_smoothing, **vars(mixing)
        )

    def loss_fn(params, batch_stats):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        logits = model(images, train=True)
        if targets is None:
            loss_targets = soft_targets(batch["label"], logits.shape[-1], label_smoothing)
        else:
            loss_targets = targets
        loss = jnp.mean(cross_entropy(logits, loss_targets))
        return loss, (logits, nnx.state(model, nnx.BatchStat))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"]
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss, gradient or update leaves the state as it was (the step still counts).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = {
        "step": state["step"] + 1,
        "params": keep(optax.apply_updates(state["params"], updates), state["params"]),
        "batch_stats": keep(batch_stats, state["batch_stats"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32),
    }
    metrics = {
        "loss": loss,
        "top1": jnp.mean(_topk_correct(logits, batch["label"], 1)),
        "grad_norm": grad_norm,
        "nonfinite": (~finite).astype(jnp.float32),
    }
    return new_state, metrics


def eval_step(
    params, batch_stats, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef
) -> dict[str, jax.Array]:
    """Sums over the real (mask == 1) examples of a padded batch: top-1, top-5, loss and count.

    A batch with ReaL label sets ('real', multi-hot) also gets `real_sums`.
    """
    model = inference.reparameterize(nnx.merge(graphdef, params, batch_stats))
    logits = model(batch["image"])
    num_classes = logits.shape[-1]
    mask = batch["mask"].astype(jnp.float32)
    loss = cross_entropy(logits, jax.nn.one_hot(batch["label"], num_classes))
    sums = {
        "top1": jnp.sum(_topk_correct(logits, batch["label"], 1) * mask),
        "top5": jnp.sum(_topk_correct(logits, batch["label"], min(5, num_classes)) * mask),
        "loss": jnp.sum(loss * mask),
        "count": jnp.sum(mask),
    }
    if "real" in batch:
        sums.update(real_sums(logits, batch["real"], batch["mask"]))
    return sums


def real_sums(logits: jax.Array, real: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """ReaL top-1 (Beyer et al. 2020) as sums: a prediction is right if it is in the image's
    label set (`real`, multi-hot); images with an empty set (and padding) are left out."""
    predicted = jax.lax.top_k(logits, 1)[1]
    hit = jnp.take_along_axis(real, predicted, axis=-1)[:, 0]
    scored = jnp.any(real, axis=-1) & (mask > 0)
    return {
        "real_top1": jnp.sum(hit & scored, dtype=jnp.float32),
        "real_count": jnp.sum(scored, dtype=jnp.float32),
    }
