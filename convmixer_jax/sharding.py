"""The device mesh and shardings: one 'data' axis over every device of every host.

Parameters and optimizer state are replicated; batches are sharded along 'data' and assembled from
each host's local slice with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def create_mesh() -> Mesh:
    """A 1-D mesh over all devices with an automatically (GSPMD) sharded 'data' axis."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Turns this host's slice of a batch into global arrays sharded along 'data'."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
