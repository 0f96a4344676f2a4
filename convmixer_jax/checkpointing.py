"""Orbax checkpoints of the training state under DIR/checkpoints/<step>/.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so the
newest *complete* step is what `latest_step` reports and what a restarted run resumes from.
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


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
    """Starts an (asynchronous) save of `state` at `step`, unless that step is already saved."""
    if manager.latest_step() != step:
        manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Restores `step` with the shapes, dtypes and shardings of `abstract_state`."""
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
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
