"""act_batch_norm: values, statistics and hand-written gradients equal plain autodiff, for the
jax.numpy version and the CPU kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convmixer_jax.ops import act_batch_norm, activate


def _jax_activation(v, kind):
    return {"gelu": lambda v: jax.nn.gelu(v, approximate=False), "relu": jax.nn.relu}.get(
        kind, lambda v: v
    )(v)


def _reference(y, shift, scale, bias, residual, kind, eps, compute=jnp.float32, act=None):
    """act then BatchNorm per group (axis 0), written plainly and left to autodiff; the bias add
    and the activation (jax.nn's unless `act`) in `compute`, everything after it in float32."""
    a = (act or _jax_activation)(y.astype(compute) + shift.astype(compute), kind)
    a = a.astype(jnp.float32)
    axes = tuple(range(1, y.ndim - 1))
    mean = a.mean(axes, keepdims=True)
    var = a.var(axes, keepdims=True)
    out = (a - mean) / jnp.sqrt(var + eps) * scale + bias
    if residual is not None:
        out = out + residual
    return out.astype(y.dtype), mean, var


def _inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    y = jnp.asarray(rng.normal(0.3, 1.5, shape), dtype)
    shift = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    bias = jnp.asarray(rng.normal(size=c), jnp.float32)
    residual = jnp.asarray(rng.normal(size=shape), dtype)
    probe = jnp.asarray(rng.normal(size=shape), jnp.float32)  # a loss that depends on every output
    return y, shift, scale, bias, residual, probe


IMPLS = ["xla", "native"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("kind", ["gelu", "relu", "identity"])
@pytest.mark.parametrize("shape", [(1, 6, 5, 5, 7), (3, 4, 3, 3, 8), (2, 70, 2, 1, 20)])
def test_values_statistics_and_gradients_match_autodiff(impl, with_residual, kind, shape):
    y, shift, scale, bias, residual, probe = _inputs(shape, jnp.float32)
    residual = residual if with_residual else None
    got = act_batch_norm(y, shift, scale, bias, residual, kind, 1e-5, impl)
    want = _reference(y, shift, scale, bias, residual, kind, 1e-5)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

    def loss(fn, *extra):
        return lambda *args: jnp.sum(fn(*args, kind, 1e-5, *extra)[0] * probe)

    argnums = (0, 1, 2, 3, 4) if with_residual else (0, 1, 2, 3)
    args = (y, shift, scale, bias, residual)
    got_grads = jax.grad(loss(act_batch_norm, impl), argnums=argnums)(*args)
    want_grads = jax.grad(loss(_reference), argnums=argnums)(*args)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(jnp.abs(w).max())))
    assert float(jnp.abs(got_grads[0]).max()) > 1e-3  # the input gradient is not trivially zero


def test_bfloat16_activation_with_float32_statistics():
    """bfloat16 inputs: bias add and activation in bfloat16, statistics and normalisation in
    float32 (equal to that reference), and within bfloat16's precision of all-float32."""
    y, shift, scale, bias, residual, probe = _inputs((2, 8, 4, 4, 6), jnp.bfloat16)
    out, mean, var = act_batch_norm(y, shift, scale, bias, residual, "gelu", 1e-5)
    assert out.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
    # The same bfloat16 rounding needs the same GELU formula (checked against jax.nn's above).
    same = _reference(y, shift, scale, bias, residual, "gelu", 1e-5, jnp.bfloat16, activate)
    np.testing.assert_allclose(mean, same[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, same[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out, same[0])
    exact = _reference(y, shift, scale, bias, residual, "gelu", 1e-5)
    np.testing.assert_allclose(mean, exact[1], rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(out.astype(jnp.float32), exact[0].astype(jnp.float32), atol=0.05)

    def loss(fn, dtype):
        return lambda y, s, r: jnp.sum(
            fn(y.astype(dtype), shift, s, bias, r.astype(dtype), "gelu", 1e-5)[0] * probe
        )

    grads = jax.grad(loss(act_batch_norm, jnp.bfloat16), argnums=(0, 1, 2))(y, scale, residual)
    assert grads[0].dtype == grads[2].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32
    want = jax.grad(loss(_reference, jnp.float32), argnums=(0, 1, 2))(y, scale, residual)
    for got, w in zip(grads, want, strict=True):
        err = float(jnp.abs(got.astype(jnp.float32) - w).max())
        assert err <= 0.02 * float(jnp.abs(w).max()), err


def test_native_statistics_of_a_large_offset_batch():
    """Sums over 65536 rows of values near 1000 (float sums per block, double across blocks)."""
    rng = np.random.default_rng(1)
    y = jnp.asarray(rng.normal(1000.0, 0.5, (1, 65536, 16)), jnp.float32)
    zeros, ones = jnp.zeros(16), jnp.ones(16)
    _, mean, var = act_batch_norm(y, zeros, ones, zeros, None, "identity", 1e-5, "native")
    y64 = np.asarray(y, np.float64)
    np.testing.assert_allclose(mean[0, 0], y64.mean(1)[0], rtol=1e-7)
    np.testing.assert_allclose(var[0, 0], y64.var(1)[0], rtol=1e-5)


def test_native_is_deterministic():
    y, shift, scale, bias, residual, probe = _inputs((1, 64, 8, 8, 24), jnp.float32)
    grad = jax.jit(
        jax.grad(
            lambda y: jnp.sum(
                act_batch_norm(y, shift, scale, bias, residual, "gelu", 1e-5, "native")[0] * probe
            )
        )
    )
    first = np.asarray(grad(y))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(grad(y)), first)


def test_native_rejects_mismatched_parameters():
    y, shift, scale, bias, _, _ = _inputs((1, 2, 3, 3, 8), jnp.float32)
    with pytest.raises(Exception, match="actnorm: shift, scale and bias need one per channel"):
        act_batch_norm(y, shift[:4], scale, bias, None, "gelu", 1e-5, "native")


def test_activate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        activate(jnp.ones(3), "swish")
