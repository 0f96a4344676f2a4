"""The device mesh helpers: batches assembled from host slices, sent to the devices ahead."""

import jax
import numpy as np

from convmixer_jax.train import sharding


def test_prefetch_keeps_order_and_values_and_reads_ahead():
    mesh = sharding.create_mesh()
    batches = [
        {"image": np.full((16, 2, 2, 3), i, np.float32), "label": np.arange(16, dtype=np.int32) + i}
        for i in range(5)
    ]
    consumed = []

    def source():
        for i, b in enumerate(batches):
            consumed.append(i)
            yield b

    stream = sharding.prefetch(mesh, source(), size=2)
    first = next(stream)
    assert consumed == [0, 1, 2]  # two batches already on their way behind the first
    out = [first, *stream]
    assert len(out) == 5
    for i, b in enumerate(out):
        assert b["image"].sharding == sharding.batch_sharded(mesh)
        assert len(b["image"].sharding.device_set) == jax.device_count() == 8
        np.testing.assert_array_equal(b["image"], batches[i]["image"])
        np.testing.assert_array_equal(b["label"], batches[i]["label"])


def test_create_mesh_on_given_devices():
    mesh = sharding.create_mesh(jax.devices()[2:6])
    assert mesh.shape == {"data": 4} and list(mesh.devices) == jax.devices()[2:6]
