"""act_batch_norm: values, statistics and hand-written gradients equal plain autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convmixer_jax.actnorm import act_batch_norm, activate


def _reference(y, scale, bias, kind, eps):
    """act then BatchNorm per group (axis 0), written plainly and left to autodiff."""
    a = {"gelu": lambda v: jax.nn.gelu(v, approximate=False), "relu": jax.nn.relu}.get(
        kind, lambda v: v
    )(y.astype(jnp.float32))
    axes = tuple(range(1, y.ndim - 1))
    mean = a.mean(axes, keepdims=True)
    var = a.var(axes, keepdims=True)
    out = (a - mean) / jnp.sqrt(var + eps) * scale + bias
    return out.astype(y.dtype), mean, var


def _inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    y = jnp.asarray(rng.normal(0.3, 1.5, shape), dtype)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    bias = jnp.asarray(rng.normal(size=c), jnp.float32)
    probe = jnp.asarray(rng.normal(size=shape), jnp.float32)  # a loss that depends on every output
    return y, scale, bias, probe


@pytest.mark.parametrize("kind", ["gelu", "relu", "identity"])
@pytest.mark.parametrize("shape", [(1, 6, 5, 5, 7), (3, 4, 3, 3, 8)])
def test_values_statistics_and_gradients_match_autodiff(kind, shape):
    y, scale, bias, probe = _inputs(shape, jnp.float32)
    got = act_batch_norm(y, scale, bias, kind, 1e-5)
    want = _reference(y, scale, bias, kind, 1e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda y, s, b: jnp.sum(fn(y, s, b, kind, 1e-5)[0] * probe)

    got_grads = jax.grad(loss(act_batch_norm), argnums=(0, 1, 2))(y, scale, bias)
    want_grads = jax.grad(loss(_reference), argnums=(0, 1, 2))(y, scale, bias)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))
    assert float(jnp.abs(got_grads[0]).max()) > 1e-3  # the input gradient is not trivially zero


def test_bfloat16_input_keeps_float32_statistics_and_dtype():
    y, scale, bias, probe = _inputs((2, 8, 4, 4, 6), jnp.bfloat16)
    out, mean, var = act_batch_norm(y, scale, bias, "gelu", 1e-5)
    assert out.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
    want = _reference(y, scale, bias, "gelu", 1e-5)
    np.testing.assert_allclose(mean, want[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.astype(jnp.float32), want[0].astype(jnp.float32), atol=0.05)
    grads = jax.grad(
        lambda y, s: jnp.sum(act_batch_norm(y, s, bias, "gelu", 1e-5)[0] * probe), argnums=(0, 1)
    )(y, scale)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32


def test_activate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        activate(jnp.ones(3), "swish")
