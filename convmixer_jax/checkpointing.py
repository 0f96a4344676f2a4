"""Orbax checkpoints of the training state under DIR/checkpoints/<step>/{model,train}.

Two items per step: `model` ({'params', 'batch_stats'}: all that evaluation, fine-tuning and
converted pretrained weights need) and `train` ({'step', 'opt_state'}). Orbax writes each
checkpoint into a temporary directory and renames it when complete, so the newest *complete* step
is what `latest_step` reports and what a restarted run resumes from.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message says which and what to do."""


def create_manager(directory: str, keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


MODEL_KEYS = ("params", "batch_stats")
TRAIN_KEYS = ("step", "opt_state")


def _split(state) -> tuple[dict, dict]:
    return {k: state[k] for k in MODEL_KEYS}, {k: state[k] for k in TRAIN_KEYS}


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
    """Starts an (asynchronous) save of `state` at `step`, unless that step is already saved."""
    if manager.latest_step() != step:
        model, train = _split(state)
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(model), train=ocp.args.StandardSave(train)
        )
        manager.save(step, args=args, force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, model_only: bool = False):
    """Restores `step` with the shapes, dtypes and shardings of `abstract_state`.

    With `model_only`, only params and batch_stats are read (and returned).
    """
    model, train = _split(abstract_state)
    items = {"model": ocp.args.StandardRestore(model)}
    if not model_only:
        items["train"] = ocp.args.StandardRestore(train)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        return {**restored["model"], **(restored["train"] if not model_only else {})}
    except Exception as e:  # Orbax raises many types for missing, truncated or mismatched files.
        raise CheckpointError(
            f"cannot restore step {step} from {manager.directory}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def abstract_with_sharding(abstract_state, shardings):
    """ShapeDtypeStructs carrying the shardings to restore into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )


def resolve(path: str) -> tuple[str, int | None]:
    """(checkpoint manager directory, step or None for newest) for a user-given path.

    Accepts a workdir, its checkpoints/ directory, or one step directory inside it.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"checkpoint path {path!r} does not exist; pass a workdir, its "
            "checkpoints/ directory or a step directory"
        )
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    name = os.path.basename(path)
    if name.isdigit():
        return os.path.dirname(path), int(name)
    return path, None
