"""Models with the weights of an Orbax checkpoint: `create_model(checkpoint=...)`, and
fine-tuning's start.

Any checkpoint of ours works: a training workdir, its checkpoints/ directory, one step directory,
or the output of `python -m convmixer_jax.convert`. Only the `model` item (params and BatchNorm
statistics) is read.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from convmixer_jax.train import checkpointing


def restore_model_item(path: str, params, batch_stats) -> dict[str, Any]:
    """{'params', 'batch_stats'} of checkpoint `path`, shaped and sharded like the given
    (abstract or concrete) trees; a CheckpointError names any array that differs."""
    directory, step = checkpointing.resolve(path)
    manager = checkpointing.create_manager(directory, read_only=True)
    target = {
        "params": _abstract(params),
        "batch_stats": _abstract(batch_stats),
        **dict.fromkeys(checkpointing.TRAIN_KEYS),
    }
    try:
        if step is None:
            state, _ = checkpointing.restore_newest(
                manager, target, model_only=True, move_aside=False
            )
        else:
            state = checkpointing.restore_step(manager, step, target, model_only=True)
    finally:
        manager.close()
    if state is None:
        raise checkpointing.CheckpointError(f"no checkpoint in {str(directory)!r}")
    return state


def _abstract(tree, shapes: dict[str, tuple[int, ...]] | None = None):
    """ShapeDtypeStructs with each leaf's sharding (one local device for unsharded leaves) and
    the shapes of `shapes` ({'head/kernel': shape}) where given."""
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = shapes or {}

    def leaf(path, x):
        key = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        if key in shapes:  # an array to be replaced: its shape differs from `x`'s sharding
            return jax.ShapeDtypeStruct(shapes[key], x.dtype, sharding=local)
        sharding = getattr(x, "sharding", None) or local
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def load(abstract_model: nnx.Module, checkpoint: str) -> nnx.Module:
    """The model of `abstract_model`'s structure (`nnx.eval_shape`) with `checkpoint`'s weights;
    a CheckpointError names any array whose shape differs."""
    graphdef, params, batch_stats = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
    state = restore_model_item(checkpoint, params, batch_stats)
    return nnx.merge(graphdef, state["params"], state["batch_stats"])


def _stored_head_shape(path: str) -> tuple[int, ...] | None:
    """Shape of the checkpoint's head kernel, or None when it cannot be read."""
    try:
        directory, step = checkpointing.resolve(path)
        if step is None:
            manager = checkpointing.create_manager(directory, read_only=True)
            step = manager.latest_step()
            manager.close()
        meta = ocp.StandardCheckpointer().metadata(directory / str(step) / "model")
        kernel = meta.item_metadata.tree["params"]["head"]["kernel"]
        return tuple((kernel["value"] if isinstance(kernel, dict) else kernel).shape)
    except Exception:  # restore_model_item then reports what is wrong with the checkpoint.
        return None


def init_from(path: str, state: dict[str, Any]) -> dict[str, Any]:
    """Training `state` with params and batch_stats taken from checkpoint `path` (fine-tuning).

    Step, optimizer state and the rest of `state` stay as given (fresh). When the checkpoint's
    head has another class count, `state`'s freshly initialised head is kept instead.
    """
    params, batch_stats = state["params"], state["batch_stats"]
    head = params["head"]
    stored = _stored_head_shape(path)
    new_head = stored is not None and stored != tuple(head["kernel"].shape)
    shapes = {"head/kernel": stored, "head/bias": stored[-1:]} if new_head else None
    target = _abstract(params, shapes)
    try:
        restored = restore_model_item(path, target, batch_stats)
    except checkpointing.CheckpointError as e:
        raise checkpointing.CheckpointError(f"init_from: {e}") from None
    if new_head:
        restored["params"]["head"] = head
    return {**state, "params": restored["params"], "batch_stats": restored["batch_stats"]}
