"""The eval-mode layers on the CPU kernels (`ops/cpu/kernels.py`) against the same layers written
out with XLA's conv and dot: values and gradients; the eval-mode model that uses them
(`model/inference.py`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convmixer_jax
from convmixer_jax import ops
from convmixer_jax.model import inference
from convmixer_jax.ops import activate
from convmixer_jax.ops.cpu import kernels, native


def _arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes]


def _depthwise_reference(x, kernel, bias, scale, shift, activation):
    y = ops.depthwise_conv(x, kernel, "xla") + bias
    return x + activate(y, activation) * scale + shift


def _pointwise_reference(x, w, bias, scale, shift, activation):
    y = jnp.einsum("...c,cd->...d", x, w, precision="highest") + bias
    return activate(y, activation) * scale + shift


def _value_and_grads(f, activation, operands, g):
    out, vjp = jax.vjp(lambda *a: f(*a, activation), *operands)
    return (out, *vjp(g))


def _check(fused_fn, reference, activation, operands, out_shape):
    (g,) = _arrays(9, out_shape)
    got = jax.jit(_value_and_grads, static_argnums=(0, 1))(fused_fn, activation, operands, g)
    want = jax.jit(_value_and_grads, static_argnums=(0, 1))(reference, activation, operands, g)
    names = ("out", "d_x", "d_weight", "d_bias", "d_scale", "d_shift")
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4, err_msg=name)


# (N, H, W, C, k): a partial 32-channel block, an even kernel, rows of 8 columns and a tail.
@pytest.mark.parametrize("activation", ["relu", "identity", "gelu"])
@pytest.mark.parametrize("shape", [(2, 9, 11, 40, 5), (3, 5, 6, 8, 4), (1, 10, 17, 64, 7)])
def test_depthwise_layer(shape, activation):
    n, h, w, c, k = shape
    operands = _arrays(0, (n, h, w, c), (k, k, 1, c), (c,), (c,), (c,))
    _check(kernels.depthwise_layer, _depthwise_reference, activation, operands, (n, h, w, c))


# (x shape, output channels): tails of the 6 x 16 register tile, several 768-deep blocks (the
# output pass must run only after the last), several 96-row tasks.
@pytest.mark.parametrize("activation", ["relu", "identity", "gelu"])
@pytest.mark.parametrize("shape,d", [((13, 20), 37), ((2, 50, 800), 50), ((300, 64), 48)])
def test_pointwise_layer(shape, d, activation):
    operands = _arrays(1, shape, (shape[-1], d), (d,), (d,), (d,))
    operands[1] = operands[1] / np.sqrt(shape[-1])
    _check(kernels.pointwise_layer, _pointwise_reference, activation, operands, (*shape[:-1], d))


def test_unknown_activation_is_refused():
    x, w, v = _arrays(2, (4, 8), (8, 8), (8,))
    with pytest.raises(ValueError, match="activation identity, relu, gelu; not 'swish'"):
        kernels.pointwise_layer(x, w, v, v, v, "swish")


def test_kernel_gelu_is_the_exact_gelu():
    # Through an identity product: the kernels' vectorised GELU on 64k values against
    # y * Phi(y) in float64, from far in the negative tail to large positive values. Its error
    # here is 9.2e-8 * max(1, |y|) at most (XLA's float32 GELU: 1.1e-7).
    tails = [-1e4, -80, -1e-30, 0, 1e-30, 5e-8, 80, 1e4]
    y = np.concatenate([np.linspace(-30, 30, 65536 - 8), tails]).astype(np.float32)
    ones, zeros = jnp.ones(8), jnp.zeros(8)
    x = jnp.asarray(y.reshape(-1, 8))
    got = kernels.pointwise_layer(x, jnp.eye(8), zeros, ones, zeros, "gelu")
    got = np.asarray(got).reshape(-1).astype(np.float64)
    y64 = y.astype(np.float64)
    want = y64 * 0.5 * np.vectorize(math.erfc)(-y64 / math.sqrt(2))
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - want) / np.maximum(1, np.abs(y64))) < 1.2e-7


@pytest.mark.parametrize(
    "activation,want",
    [
        ("gelu", [np.nan, np.inf, 0, 0, 1e4, -0.15865525, 0, 0.84134475]),
        ("relu", [np.nan, np.inf, 0, 0, 1e4, 0, 0, 1]),
    ],
)
def test_kernel_activations_keep_nan_and_infinities(activation, want):
    # act(0 * 1 + bias) per channel through a 1 x 1 depthwise layer (plus its zero residual).
    bias = jnp.array([np.nan, np.inf, -np.inf, -1e4, 1e4, -1, 0, 1], jnp.float32)
    x, ones, zeros = jnp.zeros((1, 1, 1, 8)), jnp.ones(8), jnp.zeros(8)
    got = kernels.depthwise_layer(x, ones.reshape(1, 1, 1, 8), bias, ones, zeros, activation)
    np.testing.assert_allclose(np.asarray(got).reshape(8), want, rtol=1e-6, atol=1e-30)


def test_fold_batch_norm_matches_eval_batch_norm():
    norm = nnx.BatchNorm(6, epsilon=1e-5, use_running_average=True, rngs=nnx.Rngs(0))
    scale, bias, mean, var, y = _arrays(3, (6,), (6,), (6,), (6,), (5, 6))
    norm.scale[...], norm.bias[...], norm.mean[...], norm.var[...] = scale, bias, mean, var**2
    s, t = ops.fold_batch_norm(scale, bias, mean, var**2, 1e-5)
    np.testing.assert_allclose(y * s + t, norm(y), rtol=1e-5, atol=1e-5)


def _eval_logits_and_hlo(activation, impl):
    model = convmixer_jax.create_model(
        "convmixer_tiny",
        num_classes=5,
        width=40,
        depth=3,
        activation=activation,
        depthwise_impl=impl,
        pointwise_impl=impl,
        rngs=nnx.Rngs(3),
    )
    # Non-trivial running statistics: one train-mode forward.
    x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 12, 12, 3)), jnp.float32)
    model(x * 2 + 1, train=True)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: inference.reparameterize(nnx.merge(graphdef, s))(x))
    return forward(state, x), forward.lower(state, x).as_text()


def test_eval_model_uses_fused_layers():
    logits, hlo = _eval_logits_and_hlo("relu", "native")
    want, xla_hlo = _eval_logits_and_hlo("relu", "xla")
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    # Both equal the model's own eval mode, BatchNorms not folded.
    model = convmixer_jax.create_model(
        "convmixer_tiny", num_classes=5, width=40, depth=3, activation="relu", rngs=nnx.Rngs(3)
    )
    x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 12, 12, 3)), jnp.float32)
    model(x * 2 + 1, train=True)
    np.testing.assert_allclose(model(x, train=False), want, rtol=1e-4, atol=1e-4)
    assert hlo.count(native_target("DEPTHWISE_LAYER")) == 3  # one per block: unrolled, no scan
    assert hlo.count(native_target("POINTWISE_LAYER")) == 3 + 1  # and the stem
    assert "stablehlo.while" not in hlo and "stablehlo.while" in xla_hlo  # XLA's path scans
    assert native_target("MATMUL") not in hlo
    # GELU models too.
    logits, gelu_hlo = _eval_logits_and_hlo("gelu", "native")
    np.testing.assert_allclose(logits, _eval_logits_and_hlo("gelu", "xla")[0], rtol=1e-4, atol=1e-4)
    assert gelu_hlo.count(native_target("POINTWISE_LAYER")) == 3 + 1
    assert gelu_hlo.count(native_target("DEPTHWISE_LAYER")) == 3


def native_target(name):
    return f"custom_call @{getattr(native, name)}("
