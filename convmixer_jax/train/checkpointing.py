"""Orbax checkpoints of the training state under DIR/checkpoints/<step>/{model,train}.

Two items per step: `model` ({'params', 'batch_stats'}: all that evaluation, fine-tuning and
converted pretrained weights need) and `train` ({'step', 'opt_state', 'skipped_steps'}).

Integrity: Orbax writes each checkpoint into a temporary directory and renames it only when
complete, so a process killed mid-save leaves no checkpoint that looks complete (and the leftover
temporary directory is removed on the next start). A complete checkpoint that later turns out
unreadable (truncated or corrupt files) is moved aside to DIR/checkpoints_unreadable/ and the
previous one is used, with a warning; a checkpoint written for another model stops the run with
an error naming the mismatched arrays. Paths may be local or gs:// URLs.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

MODEL_KEYS = ("params", "batch_stats")
TRAIN_KEYS = ("step", "opt_state", "skipped_steps")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or used; the message says which and what to do."""


class _Unreadable(Exception):
    """Internal: this step's files cannot be read; an older step may still be good."""


def create_manager(directory, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(_absolute(directory), options=options)


def _absolute(path) -> epath.Path:
    path = epath.Path(path)
    return path if "://" in str(path) else path.resolve()


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


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{'params/blocks/0/depthwise/kernel': shape, ...} for an abstract or stored tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        if names[-1] == "value":  # nnx.Variable leaves
            names.pop()
        out["/".join(names)] = tuple(leaf.shape)
    return out


def _check_matches(manager: ocp.CheckpointManager, step: int, abstract_model) -> None:
    """Raises CheckpointError if the stored model arrays differ from what the config builds."""
    try:
        meta = ocp.StandardCheckpointer().metadata(manager.directory / str(step) / "model")
        stored = _shapes(meta.item_metadata.tree)
    except Exception as e:  # unreadable metadata: let the caller try an older step
        raise _Unreadable(f"{type(e).__name__}: {_first_line(e)}") from None
    wanted = _shapes(abstract_model)
    problems = [f"{k} is missing" for k in wanted if k not in stored]
    problems += [f"{k} is not in the model" for k in stored if k not in wanted]
    problems += [
        f"{k} has shape {stored[k]}, the config needs {wanted[k]}"
        for k in wanted
        if k in stored and stored[k] != wanted[k]
    ]
    if problems:
        shown = "; ".join(problems[:3])
        if len(problems) > 3:
            shown += f"; and {len(problems) - 3} more"
        raise CheckpointError(
            f"the checkpoint at step {step} in {manager.directory} was written for another "
            f"model ({shown}); use the config it was trained with or another workdir"
        )


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, model_only: bool = False):
    """Restores `step` with the shapes, dtypes and shardings of `abstract_state`.

    With `model_only`, only params and batch_stats are read (and returned).
    """
    model, train = _split(abstract_state)
    _check_matches(manager, step, model)
    items = {"model": ocp.args.StandardRestore(model)}
    if not model_only:
        items["train"] = ocp.args.StandardRestore(train)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types for missing, truncated or corrupt files.
        raise _Unreadable(f"{type(e).__name__}: {_first_line(e)}") from None
    return {**restored["model"], **(restored["train"] if not model_only else {})}


def restore_newest(
    manager: ocp.CheckpointManager, abstract_state, *, model_only: bool = False, move_aside: bool
):
    """(state, step) of the newest readable checkpoint, or (None, None) when there is none.

    Unreadable checkpoints are skipped with a warning (and with `move_aside`, moved by process 0
    to checkpoints_unreadable/ so the run can save that step again); if none is readable the run
    stops rather than starting over.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            return restore(manager, step, abstract_state, model_only), step
        except _Unreadable as e:
            logging.warning(
                "Checkpoint step %d in %s is unreadable (%s).", step, manager.directory, e
            )
            if move_aside and jax.process_index() == 0:
                aside = manager.directory.parent / "checkpoints_unreadable"
                aside.mkdir(parents=True, exist_ok=True)
                (manager.directory / str(step)).rename(aside / str(step))
                logging.warning(
                    "Moved it to %s; trying the previous checkpoint.", aside / str(step)
                )
    if steps:
        raise CheckpointError(
            f"no readable checkpoint in {manager.directory} (tried steps {steps}); restore them "
            "from a backup or start a new workdir"
        )
    return None, None


def restore_step(manager: ocp.CheckpointManager, step: int, abstract_state, model_only: bool):
    """Restores exactly `step` (no fallback), turning read errors into CheckpointError."""
    if step not in manager.all_steps():
        raise CheckpointError(f"no checkpoint at step {step} in {manager.directory}")
    try:
        return restore(manager, step, abstract_state, model_only)
    except _Unreadable as e:
        raise CheckpointError(f"cannot read step {step} in {manager.directory}: {e}") from None


def abstract_with_sharding(abstract_state, shardings):
    """ShapeDtypeStructs carrying the shardings to restore into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )


def resolve(path: str) -> tuple[epath.Path, int | None]:
    """(checkpoint manager directory, step or None for newest) for a user-given path.

    Accepts a workdir, its checkpoints/ directory, or one step directory inside it.
    """
    path = _absolute(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint path {str(path)!r} does not exist; pass a workdir, its "
            "checkpoints/ directory or a step directory"
        )
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit():
        return path.parent, int(path.name)
    return path, None
