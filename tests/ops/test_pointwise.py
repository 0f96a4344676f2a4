"""ops.pointwise_conv(impl='native') against XLA's dot: values, gradients, dtypes, transposes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convmixer_jax import ops
from convmixer_jax.ops.cpu import kernels, native
from convmixer_jax.train.config import ConfigError, base_config, validate


def pointwise_product(x, w, impl):
    return ops.pointwise_conv(x, w[None, None], impl)

# (x shape, output channels): one register tile and less, rows over several 96-row tasks with a
# partial last one, depth over several 768-deep blocks, columns past a 16-column panel.
CASES = [
    ((3, 5, 7, 13), 9),
    ((2, 4, 4, 40), 40),
    ((600, 1700), 20),
    ((1, 10, 10, 100), 33),
]


def _inputs(shape, d, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, np.float32)
    w = rng.standard_normal((shape[-1], d), np.float32) / np.sqrt(shape[-1])
    g = rng.standard_normal((*shape[:-1], d), np.float32)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)


def _value_and_grads(impl):
    def f(x, w, g):
        out, vjp = jax.vjp(lambda x, w: pointwise_product(x, w, impl=impl), x, w)
        return (out, *vjp(g.astype(out.dtype)))

    return jax.jit(f)


@pytest.mark.parametrize("shape,d", CASES)
def test_native_matches_xla(shape, d):
    x, w, g = _inputs(shape, d)
    want = _value_and_grads("xla")(x, w, g)
    got = _value_and_grads("native")(x, w, g)
    for name, a, b in zip(("out", "dx", "dw"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


# (m, k, n): few rows over a long depth, which the kernel cuts into slices summed at the end (on
# two or more threads), and rows over many tasks (on up to 8 threads) with the depth in several
# 768-deep blocks.
@pytest.mark.parametrize("m,k,n", [(101, 800, 37), (1700, 1600, 40)])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_kernel_transposes(transpose_a, transpose_b, m, k, n):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((m, k), np.float32) / np.sqrt(k)
    b = rng.standard_normal((k, n), np.float32)
    stored_a = a.T.copy() if transpose_a else a
    stored_b = b.T.copy() if transpose_b else b
    native.load()
    got = jax.jit(
        lambda p, q: kernels._product(
            p, q, transpose_a=transpose_a, transpose_b=transpose_b
        )
    )(stored_a, stored_b)
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-4)


def test_bfloat16_is_computed_in_float32_and_returned_as_bfloat16():
    x, w, g = _inputs((4, 6, 6, 40), 24, seed=2)
    want = _value_and_grads("xla")(x, w, g)
    got = _value_and_grads("native")(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), g)
    for name, a, b in zip(("out", "dx", "dw"), got, want, strict=True):
        assert a.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=0.05, atol=0.1, err_msg=name)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pointwise_impl": "blas"}, "model.pointwise_impl: 'blas' is unknown"),
        ({"pointwise_impl": "native", "remat": "dots"}, "invisible to remat 'dots'"),
    ],
)
def test_config_validation(overrides, message):
    c = base_config()
    validate(c, 8)
    c.model.update(overrides)
    with pytest.raises(ConfigError, match=message):
        validate(c, 8)
