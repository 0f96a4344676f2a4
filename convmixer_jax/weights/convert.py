"""Converts ConvMixer weights between PyTorch state dicts and this project's Orbax checkpoints
(the command line: `python -m convmixer_jax.convert`).

Sources: timm state dicts (`.safetensors`, read without PyTorch; `.bin` / `.pth`) and the authors'
release files (`convmixer_*.pth.tar`): a bare state dict or a training checkpoint holding it under
`state_dict`, `state_dict_ema` or `model`, optionally with DataParallel's `module.` prefix, named
either like timm or like the authors' flat `nn.Sequential`. PyTorch pickles need `torch`, imported
only when such a file is read.

Layouts: conv weights OIHW <-> HWIO, Linear weights transposed, BatchNorm running mean/var <->
the batch statistics (`num_batches_tracked` is dropped, and written as 0 for timm). The output
is a checkpoint directory with one step (0) whose `model` item holds params and batch_stats, so it
restores wherever a trained checkpoint does (`--mode eval --config.checkpoint=DIR`,
`--config.init_from=DIR`, `convmixer_jax.create_model(NAME, checkpoint=DIR)`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy
from etils import epath
from flax import nnx

from convmixer_jax import ops
from convmixer_jax.model import registry
from convmixer_jax.model.convmixer import ConvMixer
from convmixer_jax.train import checkpointing

# Our module names -> timm's module names (block modules are relative to `blocks.<i>.`).
_MODULES = {
    "stem": "stem.0",
    "stem_norm": "stem.2",
    "depthwise": "0.fn.0",
    "norm1": "0.fn.2",
    "pointwise": "1",
    "norm2": "3",
    "head": "head",
}
# Our variable names -> PyTorch parameter / buffer names.
_LEAVES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
# Wrapper keys of training checkpoints, in order of preference (the plain weights first).
_WRAPPERS = ("state_dict", "model", "state_dict_ema")
_STEP = 0


class ConversionError(ValueError):
    """A source file that cannot be read or does not fit the model; the message says which."""


def timm_name(path: tuple) -> str:
    """The timm state-dict key of one of our variables, e.g. ('blocks', 3, 'norm1', 'var') ->
    'blocks.3.0.fn.2.running_var'."""
    *modules, leaf = (str(p) for p in path)
    if modules[0] == "blocks":
        prefix = f"blocks.{modules[1]}.{_MODULES[modules[2]]}"
    else:
        prefix = _MODULES[modules[0]]
    return f"{prefix}.{_LEAVES[leaf]}"


def from_torch_layout(array: np.ndarray) -> np.ndarray:
    """PyTorch layout -> ours: conv OIHW -> HWIO, Linear (out, in) -> (in, out)."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array.T if array.ndim == 2 else array


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of an array of ours with `shape` (see to_torch_layout)."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Ours -> PyTorch layout: conv HWIO -> OIHW, Linear (in, out) -> (out, in)."""
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return np.ascontiguousarray(array.T if array.ndim == 2 else array)


# ---------------------------------------------------------------------------------------------
# Reading PyTorch-side files


def read_state_dict(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """The state dict in `path` as float32 NumPy arrays, unwrapped and without `module.`.

    PyTorch pickles are read with `weights_only=True` (no code runs) unless `trust_pickle`.
    """
    if not epath.Path(path).is_file():
        raise ConversionError(f"source {path!r} is not a file")
    if str(path).endswith(".safetensors"):
        try:
            tensors = safetensors.numpy.load_file(str(path))
        except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
            raise ConversionError(f"cannot read {path} as safetensors: {_first_line(e)}") from None
    else:
        tensors = _read_torch(str(path), trust_pickle)
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return {
        k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
        for k, v in tensors.items()
    }


def _read_torch(path: str, trust_pickle: bool) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"reading {path} needs PyTorch (pip install torch); .safetensors files do not"
        ) from None
    try:
        # Training checkpoints store their argparse options next to the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises many types for non-pickles, truncation, bad objects.
        reason = _first_line(e)
        if reason.startswith("Weights only load failed"):
            reason = "it holds Python objects besides tensors; pass --trust_pickle if you trust it"
        raise ConversionError(f"cannot read {path} with torch.load: {reason}") from None
    state = _unwrap(obj, path)
    return {
        k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def _unwrap(obj, path: str) -> Mapping:
    """The state dict inside a training checkpoint (or `obj` itself when it is one)."""
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            inner = obj.get(key)
            if hasattr(inner, "state_dict"):  # a pickled nn.Module (with --trust_pickle)
                inner = inner.state_dict()
            if isinstance(inner, Mapping) and inner:
                return inner
        return obj
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Names: the authors' flat nn.Sequential


def _authors_prefixes(depth: int) -> list[tuple[str, str]]:
    """(authors' prefix, timm prefix) pairs of nn.Sequential(conv, act, BN, *blocks, pool,
    flatten, linear)."""
    pairs = [("0.", "stem.0."), ("2.", "stem.2.")]
    pairs += [(f"{3 + i}.", f"blocks.{i}.") for i in range(depth)]
    return [*pairs, (f"{depth + 5}.", "head.")]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _uses_authors_names(state_dict: Mapping[str, np.ndarray]) -> bool:
    return "0.weight" in state_dict and "stem.0.weight" not in state_dict


# ---------------------------------------------------------------------------------------------
# Filling a model


def variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """{timm key: variable} for every parameter and batch statistic of `model`."""
    return {
        timm_name(path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Param | nnx.BatchStat)
    }


def _describe(state_dict: Mapping[str, np.ndarray]) -> str:
    """The architecture a timm-named state dict holds, for error messages ('' if unclear)."""
    try:
        width, _, patch, _ = state_dict["stem.0.weight"].shape
        classes = state_dict["head.weight"].shape[0]
        kernel = state_dict["blocks.0.0.fn.0.weight"].shape[-1]
    except (KeyError, ValueError):
        return ""
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    return (
        f" (the file holds width {width}, depth {depth}, kernel_size {kernel}, "
        f"patch_size {patch}, {classes} classes)"
    )


def load_state_dict(
    model: nnx.Module, state_dict: Mapping[str, np.ndarray], source: str = "the state dict"
) -> nnx.Module:
    """Sets every variable of `model` (may be abstract) from a timm- or authors'-named state dict.

    Raises ConversionError listing each missing, unexpected and mismatched key, with its name in
    the file's own naming.
    """
    targets = variables(model)
    if _uses_authors_names(state_dict):
        pairs = _authors_prefixes(len(model.blocks))
        to_file = [(new, old) for old, new in pairs]
    else:
        pairs = to_file = []
    named = {
        _rename(k, pairs): (k, v)
        for k, v in state_dict.items()
        if not k.endswith(".num_batches_tracked")
    }
    problems = [f"missing {_rename(k, to_file)}" for k in targets if k not in named]
    problems += [f"unexpected {original}" for k, (original, _) in named.items() if k not in targets]
    for key, variable in targets.items():
        if key in named:
            original, array = named[key]
            want = torch_shape(variable.get_value().shape)
            if array.shape != want:
                problems.append(f"{original} has shape {array.shape}, the model needs {want}")
    if problems:
        about = _describe({k: a for k, (_, a) in named.items()})
        raise ConversionError(f"{source} does not fit the model{about}: " + "; ".join(problems))
    for key, variable in targets.items():
        variable.set_value(jnp.asarray(from_torch_layout(named[key][1]), jnp.float32))
    return model


def build(model_name: str, **overrides) -> ConvMixer:
    """The abstract (shape-only) model `model_name` with `overrides`, to be filled."""
    return nnx.eval_shape(lambda: registry.create_model(model_name, **overrides))


def write_checkpoint(model: nnx.Module, out: str) -> epath.Path:
    """Saves `model`'s params and batch_stats as step 0 of a new checkpoint directory `out`."""
    path = epath.Path(out)
    if path.name.isdigit():
        raise ConversionError(
            f"--out {out!r}: a directory named by a number reads as a checkpoint step; rename it"
        )
    if path.exists() and any(path.iterdir()):
        raise ConversionError(f"--out {out!r} exists and is not empty; choose a new directory")
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    manager = checkpointing.create_manager(path, keep=1)
    item = ocp.args.StandardSave({"params": params, "batch_stats": batch_stats})
    manager.save(_STEP, args=ocp.args.Composite(model=item))
    manager.wait_until_finished()
    manager.close()
    return path


def convert(
    source: str, out: str, model_name: str, *, trust_pickle: bool = False, **overrides
) -> ConvMixer:
    """Converts a PyTorch-side file into an Orbax checkpoint at `out`; returns the model."""
    state_dict = read_state_dict(source, trust_pickle=trust_pickle)
    model = load_state_dict(build(model_name, **overrides), state_dict, source)
    write_checkpoint(model, out)
    return model


# ---------------------------------------------------------------------------------------------
# The reverse direction


def read_checkpoint(checkpoint: str) -> dict[str, np.ndarray]:
    """{'params/stem/kernel': array, ...}: the model item of any of our checkpoints.

    `checkpoint` is a workdir, its checkpoints/ directory or a step directory (newest step if
    none is named).
    """
    directory, step = checkpointing.resolve(checkpoint)
    manager = checkpointing.create_manager(directory, read_only=True)
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise checkpointing.CheckpointError(f"no checkpoint found in {str(directory)!r}")
    try:
        meta = ocp.StandardCheckpointer().metadata(directory / str(step) / "model")
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
            meta.item_metadata.tree,
        )
        restored = manager.restore(
            step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target))
        )["model"]
    except Exception as e:  # Orbax raises many types for missing, truncated or corrupt files.
        raise checkpointing.CheckpointError(
            f"cannot read step {step} in {directory}: {_first_line(e)}"
        ) from None
    finally:
        manager.close()
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        flat["/".join(n for n in names if n != "value")] = np.asarray(leaf)
    return flat


def to_timm(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A timm ConvMixer state dict from read_checkpoint's arrays."""
    out = {}
    for path, array in flat.items():
        try:
            out[timm_name(tuple(path.split("/")[1:]))] = to_torch_layout(array.astype(np.float32))
        except (KeyError, IndexError):
            raise ConversionError(f"{path} is not a ConvMixer variable") from None
    for key in [k for k in out if k.endswith(".running_mean")]:
        out[key.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


def export_timm(checkpoint: str, out: str) -> dict[str, np.ndarray]:
    """Writes the timm state dict of `checkpoint` to the .safetensors file `out`; returns it."""
    if not out.endswith(".safetensors"):
        raise ConversionError(f"--out {out!r}: use a file name ending in .safetensors")
    state_dict = to_timm(read_checkpoint(checkpoint))
    epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(state_dict, out)
    return state_dict


# ---------------------------------------------------------------------------------------------
# Command line


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """--model plus the architecture overrides of registry.create_model (0 / '': registered)."""
    parser.add_argument(
        "--model", choices=registry.list_models(), required=required, help="registered variant"
    )
    parser.add_argument("--num_classes", type=int, default=0, help="0: the variant's")
    for field in ("width", "depth", "kernel_size", "patch_size"):
        parser.add_argument(f"--{field}", type=int, default=0, help="0: the variant's")
    parser.add_argument("--activation", choices=list(ops.ACTIVATIONS), default="")


def model_arguments(args: argparse.Namespace) -> dict:
    """The create_model keyword arguments given by add_model_arguments' flags."""
    fields = ("num_classes", "width", "depth", "kernel_size", "patch_size", "activation")
    return {f: getattr(args, f) for f in fields if getattr(args, f)}
