"""The train and eval steps: sharded over 8 devices equals 1 device; eval counts exactly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import convmixer_jax
from convmixer_jax.train import config as config_lib
from convmixer_jax.train import optim, steps


def _setup():
    model = convmixer_jax.create_model(
        "convmixer_tiny", num_classes=10, width=16, depth=2, rngs=nnx.Rngs(0)
    )
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    c = config_lib.base_config()
    tx = optim.create_optimizer(c, optim.onecycle_schedule(0.01, 10))
    state = steps.init_train_state(params, batch_stats, tx)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(16, 8, 8, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
    }
    step = functools.partial(steps.train_step, graphdef=graphdef, tx=tx, label_smoothing=0.1)
    return state, batch, step


def _run(mesh_devices):
    state, batch, step = _setup()
    mesh = jax.make_mesh(
        (len(mesh_devices),),
        ("data",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=mesh_devices,
    )
    repl = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    data = NamedSharding(mesh, P("data"))
    state = jax.device_put(state, repl)
    batch = jax.device_put(batch, data)
    fn = jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, NamedSharding(mesh, P())))
    for _ in range(3):
        state, metrics = fn(state, batch)
    return jax.device_get(state), jax.device_get(metrics)


def test_eight_devices_equal_one_device():
    assert jax.device_count() == 8
    s1, m1 = _run(jax.devices()[:1])
    s8, m8 = _run(jax.devices())
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    assert int(s8["step"]) == 3


def test_train_step_reduces_loss_and_updates_batch_stats():
    state, batch, step = _setup()
    fn = jax.jit(step)
    before = jax.device_get(state["batch_stats"])
    losses = []
    for _ in range(8):
        state, metrics = fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    after = jax.device_get(state["batch_stats"])
    assert any(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )


def test_soft_targets_label_smoothing():
    t = steps.soft_targets(jnp.array([2]), 4, 0.1)
    np.testing.assert_allclose(t, [[0.025, 0.025, 0.925, 0.025]], rtol=1e-6)
    logits = jnp.array([[1.0, 2.0, 3.0, 0.5]])
    want = -np.sum(np.asarray(t) * np.asarray(jax.nn.log_softmax(logits)))
    np.testing.assert_allclose(steps.cross_entropy(logits, t), [want], rtol=1e-6)


def test_eval_step_masks_padding():
    state, batch, _ = _setup()
    graphdef = nnx.graphdef(
        convmixer_jax.create_model("convmixer_tiny", num_classes=10, width=16, depth=2)
    )
    logits = nnx.merge(graphdef, state["params"], state["batch_stats"])(batch["image"])
    labels = jnp.argmax(logits, -1)
    labels = labels.at[:4].set((labels[:4] + 1) % 10)  # 4 wrong, 12 right
    mask = jnp.ones(16, jnp.int32).at[12:].set(0)  # the last 4 are padding
    out = steps.eval_step(
        state["params"],
        state["batch_stats"],
        {"image": batch["image"], "label": labels, "mask": mask},
        graphdef=graphdef,
    )
    assert float(out["count"]) == 12
    assert float(out["top1"]) == 8
    assert float(out["top5"]) >= 8
    want_loss = -np.sum(
        np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(labels)[:, None], 1)[
            :12
        ]
    )
    np.testing.assert_allclose(float(out["loss"]), want_loss, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_topk(k):
    logits = jnp.array([[0.1, 0.5, 0.2, 0.9], [1.0, 0.0, 0.3, 0.2]])
    got = steps._topk_correct(logits, jnp.array([1, 2]), k)
    want = [0.0, 0.0] if k == 1 else [1.0, 1.0]
    np.testing.assert_allclose(got, want)
