"""Schedules against NumPy references, and the optimizer's clipping and weight-decay mask."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from convmixer_jax.train import config as config_lib
from convmixer_jax.train import optim


@pytest.mark.parametrize("total", [10, 37, 1000])
def test_onecycle_matches_numpy(total):
    lr = 0.01
    sched = optim.onecycle_schedule(lr, total)
    steps = np.arange(total + 1)
    want = np.interp(steps, [0, 0.4 * total, 0.8 * total, total], [0, lr, lr / 20, 0])
    got = np.array([float(sched(s)) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert float(sched(0)) == 0.0 and float(sched(total)) == 0.0
    np.testing.assert_allclose(float(sched(0.4 * total)), lr, rtol=1e-6)


def test_cosine_matches_numpy():
    peak, total, warmup = 0.1, 100, 10
    sched = optim.cosine_schedule(peak, total, warmup)
    for s in range(total + 1):
        if s < warmup:
            want = peak * s / warmup
        else:
            want = 0.5 * peak * (1 + np.cos(np.pi * (s - warmup) / (total - warmup)))
        np.testing.assert_allclose(float(sched(s)), want, rtol=1e-5, atol=1e-8)


def test_create_schedule_picks_by_config():
    c = config_lib.base_config()
    c.schedule = "cosine"
    c.warmup_epochs = 1.0
    sched = optim.create_schedule(c, total_steps=100, steps_per_epoch=20)
    np.testing.assert_allclose(float(sched(10)), c.learning_rate * 0.5, rtol=1e-6)


def _params():
    return {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))}


def test_weight_decay_only_on_matrices_and_clipping():
    c = config_lib.base_config()
    c.weight_decay, c.grad_clip_norm = 0.5, 1.0
    tx = optim.create_optimizer(c, lambda step: 0.1)
    params = _params()
    zero_grads = {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With zero gradients only decoupled weight decay moves parameters: -lr * wd * p.
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], 0.0)
    c.weight_decay_all = True
    tx = optim.create_optimizer(c, lambda step: 0.1)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["bias"], -0.05, rtol=1e-6)

    # Clipping: a huge gradient gives the same first Adam step as the clipped one.
    big = {"kernel": jnp.full((3, 4), 100.0), "bias": jnp.full((4,), 100.0)}
    norm = float(optax.tree.norm(big))
    clipped = {k: v / norm for k, v in big.items()}
    c.weight_decay = 0.0
    tx = optim.create_optimizer(c, lambda step: 0.1)
    u_big, state_big = tx.update(big, tx.init(params), params)
    c.grad_clip_norm = 0.0
    tx_noclip = optim.create_optimizer(c, lambda step: 0.1)
    _, state_ref = tx_noclip.update(clipped, tx_noclip.init(params), params)
    mu_big = state_big[1][0].mu["kernel"]
    np.testing.assert_allclose(mu_big, state_ref[0].mu["kernel"], rtol=1e-6)
