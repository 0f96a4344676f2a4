"""The device mesh and shardings: one 'data' axis over every device of every host.

Batches are sharded along 'data' and assembled from each host's local slice with
`jax.make_array_from_process_local_data`. The training state is either replicated (pure data
parallelism) or, with sharding='fsdp', split along 'data' too: each array on its largest
dimension that the device count divides, so wide models need 1/N of the memory per device. XLA
inserts the gathers; the numbers are the same either way.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all of them) with an automatically (GSPMD) sharded
    'data' axis."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def fsdp_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Shards the largest dimension the 'data' axis divides; replicates small/odd arrays."""
    n = mesh.shape["data"]
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % n == 0 and size >= n]
    if n == 1 or not candidates:
        return replicated(mesh)
    axis = max(candidates)[1]
    return NamedSharding(mesh, PartitionSpec(*[None] * axis, "data"))


def state_sharding(mesh: Mesh, abstract_state, mode: str):
    """Shardings for every leaf of the training state: 'replicated' or 'fsdp'."""
    if mode == "fsdp":
        return jax.tree.map(lambda x: fsdp_sharding(mesh, x.shape), abstract_state)
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def prefetch(mesh: Mesh, local_batches: Iterator[dict], size: int = 2) -> Iterator[dict]:
    """Global device batches of `local_batches`, `size` of them in flight: each batch is sent
    to the devices (asynchronously) while the steps before it run."""
    queue = collections.deque()
    for local in local_batches:
        queue.append(global_batch(mesh, local))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Turns this host's slice of a batch into global arrays sharded along 'data'."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
