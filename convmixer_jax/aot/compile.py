"""Compile the real train and eval steps for a TPU or GPU target without the hardware.

libtpu and the CUDA plugin compile for devices that are not attached ("deviceless" compiles, as
MaxText's train_compile.py does). What comes back is exact for what a device will hold (memory,
or the compiler's out-of-memory error), what it will compute (FLOPs and collectives in the
optimised program) and, on TPU, libtpu's cost model. Timings stay estimates: nothing runs.
`python -m convmixer_jax.benchmark aot` prints these figures (`figures`).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.experimental.layout import Format, Layout

from convmixer_jax import ops
from convmixer_jax.aot import hlo, targets
from convmixer_jax.model import convmixer, flops, registry
from convmixer_jax.train import config as config_lib
from convmixer_jax.train import sharding, state

FIT_FRACTION = 0.9  # a program fits when its peak is at most this share of usable memory


class CompilerMissing(RuntimeError):
    """The target's compiler (libtpu or the CUDA plugin) is not installed."""


def cpu_target() -> targets.Target:
    """This machine's CPU devices as a target (their memory is the host's, shared)."""
    n = jax.device_count()
    return targets.Target("cpu", "cpu", "", n, host_memory_bytes() // n, 0.0)


def resolve(name: str) -> targets.Target:
    """The target `name`: one of targets.TARGETS, or 'cpu' for this machine's CPU devices."""
    if name == "cpu":
        return cpu_target()
    try:
        return targets.get(name)
    except ValueError as e:
        raise config_lib.ConfigError(f"target: {e}") from None


def prepare(target: targets.Target) -> None:
    """Settings for compiling without a device; call before JAX starts any backend.

    JAX itself runs on the CPU. libtpu is told the slice it would otherwise look up from a TPU
    VM's metadata, and the CUDA plugin skips the checks of drivers that are not there.
    """
    if target.platform == "cpu":
        return
    if target.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            raise CompilerMissing(
                f"target {target.name} needs libtpu; run `make aot-env` and use .venv-aot/bin/"
                "python, or pip install -e '.[aot]' in an environment of its own"
            )
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiles only: nothing to share
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    elif target.platform == "cuda":
        if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
            raise CompilerMissing(
                f"target {target.name} needs the CUDA plugin; run `make aot-env` and use "
                ".venv-aot/bin/python, or pip install -e '.[aot]' in an environment of its own"
            )
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    jax.config.update("jax_platforms", "cpu")


def devices(target: targets.Target) -> list:
    """The target's devices, for building a mesh and compiling (never for running)."""
    from jax.experimental import topologies

    if target.platform == "cpu":
        return jax.devices()
    if target.platform == "tpu":
        kwargs = {"chip_config_name": target.chip_config} if target.chip_config else {}
        if target.hosts_shape:
            kwargs["chips_per_host_bounds"] = target.hosts_shape
        return list(topologies.get_topology_desc(target.topology, "tpu", **kwargs).devices)
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=target.card.target_config(), topology=target.topology
    )
    return list(topology.devices)


def pin_impls(config: ml_collections.ConfigDict, devs: list) -> ml_collections.ConfigDict:
    """`config` with the implementations `ops.policy` picks for `devs`, so that the one-device
    and one-block compiles run the same ones."""
    m = config.model
    impls = ops.resolve(
        m.depthwise_impl, m.pointwise_impl, dtype=jnp.dtype(config.dtype), remat=m.remat,
        devices=devs,
    )  # fmt: skip
    config = copy.deepcopy(config)
    config.model.depthwise_impl, config.model.pointwise_impl = impls.depthwise, impls.pointwise
    return config


def peak_bytes(compiled) -> int | None:
    """Peak bytes of one device: arguments + outputs + temporaries - aliased (XLA's memory
    analysis of the compiled program), None where the platform gives none."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )  # fmt: skip


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), repr(error))


def compile_steps(config: ml_collections.ConfigDict, devs: list) -> dict:
    """Compiles the train and eval steps of `config` on a mesh of `devs`: {'train', 'eval'}
    compiled programs, or {'error': the compiler's message} when they do not fit."""
    num_classes = registry.config_architecture(config.model)["num_classes"]
    setup = state.create(config, num_classes, 1000, 1000.0, sharding.create_mesh(devs))
    params = setup.abstract_state["params"]
    stats = setup.abstract_state["batch_stats"]
    try:
        train = state.train_step(setup).lower(
            setup.abstract_state, state.batch_shapes(config, config.batch_size)
        )
        train = train.compile()
        batch = state.batch_shapes(config, config.eval_batch_size or config.batch_size, False)
        evaluate = state.eval_step(setup).lower(params, stats, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"error": _first_line(e)}
    return {"train": train, "eval": evaluate}


def _single_device_config(config: ml_collections.ConfigDict, per_device: int):
    """The same step on one device at the per-device batch; a group spanning devices becomes
    that device's whole batch (the same arithmetic, its statistics left unshared)."""
    config = copy.deepcopy(config)
    config.batch_size = per_device
    config.eval_batch_size = 0
    for key in ("bn_group_size", "mixup_group_size"):
        if config[key] > per_device:
            config[key] = 0
    return config


def block_program(config: ml_collections.ConfigDict, batch: int, devs: list):
    """One mixer block's forward and backward (input and parameter gradients, the cotangent an
    input) on one device at `batch` images (a one-device config: its groups fit the batch),
    compiled; activations in the layouts the compiler prefers, as they are inside the network."""
    arch = registry.config_architecture(config.model)
    dtype = jnp.dtype(config.dtype)
    impls = ops.resolve(
        config.model.depthwise_impl, config.model.pointwise_impl, dtype=dtype,
        remat=config.model.remat, devices=devs[:1],
    )  # fmt: skip
    block = nnx.eval_shape(
        lambda: convmixer.MixerBlock(
            arch["width"], arch["kernel_size"], activation=arch["activation"], dtype=dtype,
            impls=impls, group_size=config.bn_group_size, rngs=nnx.Rngs(0),
        )
    )  # fmt: skip
    graphdef, params, stats = nnx.split(block, nnx.Param, nnx.BatchStat)
    tokens = config.image_size // arch["patch_size"]
    x = jax.ShapeDtypeStruct((batch, tokens, tokens, arch["width"]), dtype)

    def forward_backward(params, stats, x, g):
        def apply(params, x):
            return nnx.merge(graphdef, params, stats, copy=True)(x, True)

        out, vjp = jax.vjp(apply, params, x)
        return out, vjp(g)

    one = sharding.replicated(sharding.create_mesh(devs[:1]))
    auto = Format(Layout.AUTO, one)
    jitted = jax.jit(forward_backward, in_shardings=(one, one, auto, auto), out_shardings=auto)
    return jitted.lower(params, stats, x, x).compile()


def _seconds(compiled) -> float | None:
    """libtpu's cost-model time of a program, None where the platform has no cost model or the
    model gives no valid answer.

    The model counts -1 s for each ConcatBitcast (it has no estimate for that zero-copy join of
    a batch the compiler split into slices); those are added back as the 0 s they take."""
    seconds = (compiled.cost_analysis() or {}).get("optimal_seconds")
    if seconds is None:
        return None
    seconds += hlo.custom_calls(compiled.as_text(), "ConcatBitcast")
    return float(seconds) if seconds > 0 else None


def estimate_step(config: ml_collections.ConfigDict, per_device: int, devs: list) -> dict:
    """The compiler's estimate of a train step on one TPU device: the step of the same model with
    one block, plus (depth - 1) x one block's forward and backward compiled alone."""
    one_block = copy.deepcopy(config)
    one_block.model.depth = 1
    one_block = _single_device_config(one_block, per_device)
    base = compile_steps(one_block, devs[:1])
    block = block_program(one_block, per_device, devs)
    block_seconds = _seconds(block)
    base_seconds = _seconds(base["train"]) if "train" in base else None
    depth = registry.config_architecture(config.model)["depth"]
    step = base_seconds + (depth - 1) * block_seconds if block_seconds and base_seconds else None
    return {
        "estimated_block_seconds": block_seconds,
        "estimated_step_seconds": step,
        "block_cycles_by_kind": hlo.tpu_cycles_by_kind(block.as_text()),
    }


def figures(config: ml_collections.ConfigDict, target: targets.Target, devs: list) -> dict:
    """Everything `benchmark aot` reports for `config` on `target` (docs/accelerators.md)."""
    config_lib.validate(config, len(devs))
    config = pin_impls(config, devs)
    per_device = config.batch_size // len(devs)
    arch = registry.config_architecture(config.model)
    forward = flops.forward_flops(
        **{k: arch[k] for k in ("width", "depth", "kernel_size", "patch_size", "num_classes")},
        image_size=config.image_size,
    )
    out = {
        "target": target.name,
        "device_kind": devs[0].device_kind,
        "devices": len(devs),
        "model": config.model.name,
        "per_device_batch": per_device,
        "global_batch": config.batch_size,
        "bn_group_size": config.bn_group_size,
        "mixup_group_size": config.mixup_group_size,
        "remat": config.model.remat,
        "dtype": config.dtype,
        "hbm_bytes": target.hbm_bytes,
        "model_train_flops_per_device": 3 * forward * per_device,
    }
    start = time.perf_counter()
    programs = compile_steps(config, devs)
    out["compile_seconds"] = time.perf_counter() - start
    if "error" in programs:
        error = programs["error"]
        return {**out, "fits": False, "peak_memory_bytes": None, "compiler_error": error}
    train_text = programs["train"].as_text()
    out["peak_memory_bytes"] = peak_bytes(programs["train"])
    out["eval_peak_memory_bytes"] = peak_bytes(programs["eval"])
    limit = FIT_FRACTION * target.hbm_bytes
    out["fits"] = out["peak_memory_bytes"] <= limit and out["eval_peak_memory_bytes"] <= limit
    out["flops_per_device"] = hlo.flops(train_text)
    single = compile_steps(_single_device_config(config, per_device), devs[:1])
    out["flops_ratio_vs_one_device"] = out["flops_per_device"] / hlo.flops(
        single["train"].as_text()
    )
    out["collectives"] = hlo.collectives(train_text)
    largest = out["collectives"]["largest_all_gather_bytes"]
    out["activation_all_gather"] = largest >= activation_bytes(config, per_device)
    if target.platform == "tpu":
        out.update(estimate_step(config, per_device, devs))
        step = out["estimated_step_seconds"]
        peak = target.peak_tflops * 1e12
        out["estimated_mfu"] = out["model_train_flops_per_device"] / step / peak if step else None
    return out


def activation_bytes(config: ml_collections.ConfigDict, per_device: int) -> int:
    """The smaller of one device's input images and one device's share of one activation map:
    an all-gather this large moves images or activations, not statistics or labels."""
    arch = registry.config_architecture(config.model)
    tokens = (config.image_size // arch["patch_size"]) ** 2
    activation = per_device * tokens * arch["width"] * jnp.dtype(config.dtype).itemsize
    images = per_device * config.image_size**2 * 3 * state.transfer_dtype(config).itemsize
    return min(activation, images)


@functools.cache
def host_memory_bytes() -> int:
    """This machine's memory, shared by its CPU devices."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
