"""Model structure, parameter counts and numerics against an independent NumPy forward pass."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convmixer_jax
from convmixer_jax.model import flops, inference, registry

# The parameter formula of the paper: h*[d*(k^2 + h + 6) + 3p^2 + classes + 3] + classes.
EXACT_PARAMS = {
    "convmixer_1536_20": 51_625_960,
    "convmixer_768_32": 21_110_248,
    "convmixer_1024_20_ks9_p14": 24_383_464,
}


def formula(h, d, k, p, classes):
    return h * (d * (k * k + h + 6) + 3 * p * p + classes + 3) + classes


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_exact_parameter_counts(name):
    model = nnx.eval_shape(lambda: convmixer_jax.create_model(name, num_classes=1000))
    assert flops.count_params(model) == EXACT_PARAMS[name]
    s = registry.MODELS[name]
    assert formula(s.width, s.depth, s.kernel_size, s.patch_size, 1000) == EXACT_PARAMS[name]


def test_cifar_model_count_and_registry():
    model = nnx.eval_shape(lambda: convmixer_jax.create_model("convmixer_256_8"))
    assert flops.count_params(model) == 594_186
    assert "convmixer_1536_20" in convmixer_jax.list_models()
    assert registry.MODELS["convmixer_768_32"].activation == "relu"
    with pytest.raises(ValueError, match="unknown model"):
        convmixer_jax.create_model("convmixer_9_9")
    with pytest.raises(ValueError, match="unknown model fields"):
        convmixer_jax.create_model("convmixer_tiny", heads=3)


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_real_variant_output_shape(name):
    def forward():
        model = convmixer_jax.create_model(name, num_classes=1000)
        return model(jnp.zeros((2, 224, 224, 3)))

    out = jax.eval_shape(forward)
    assert out.shape == (2, 1000) and out.dtype == jnp.float32


def test_overrides_and_input_sizes():
    model = convmixer_jax.create_model(
        "convmixer_1536_20", num_classes=7, width=16, depth=2, kernel_size=4, patch_size=4
    )
    assert model.head.kernel.shape == (16, 7)
    assert model.blocks[0].depthwise.kernel.shape == (4, 4, 1, 16)
    for size in (16, 24, 36):
        assert model(jnp.zeros((1, size, size, 3))).shape == (1, 7)
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        model(jnp.zeros((1, 30, 30, 3)))


def test_config_architecture_fills_unset_fields_from_the_registry():
    from convmixer_jax.train import config as config_lib

    c = config_lib.base_config().model
    c.name, c.depth, c.activation = "convmixer_768_32", 4, "gelu"
    assert registry.config_architecture(c) == {
        "width": 768,
        "depth": 4,
        "kernel_size": 7,
        "patch_size": 7,
        "activation": "gelu",
        "num_classes": 1000,
    }


def test_pytorch_default_init_bounds():
    model = convmixer_jax.create_model("convmixer_tiny", rngs=nnx.Rngs(3))
    k, p, h = 5, 2, 96
    for arr, fan_in in [
        (model.stem.kernel[...], 3 * p * p),
        (model.stem.bias[...], 3 * p * p),
        (model.blocks[0].depthwise.kernel[...], k * k),
        (model.blocks[0].depthwise.bias[...], k * k),
        (model.blocks[0].pointwise.kernel[...], h),
        (model.head.kernel[...], h),
    ]:
        bound = 1 / math.sqrt(fan_in)
        assert float(jnp.max(jnp.abs(arr))) <= bound
        # Uniform on [-b, b]: the spread covers most of the interval.
        assert float(jnp.max(jnp.abs(arr))) > 0.8 * bound
    bn = model.stem_norm
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5
    np.testing.assert_array_equal(bn.scale[...], 1.0)


def _numpy_forward(model, x):
    """Independent NumPy ConvMixer forward pass in eval mode (running BN statistics)."""
    erf = np.vectorize(math.erf)

    def gelu(v):
        return 0.5 * v * (1 + erf(v / math.sqrt(2)))

    def bn(v, norm):
        mean, var = np.asarray(norm.mean[...]), np.asarray(norm.var[...])
        return (v - mean) / np.sqrt(var + 1e-5) * np.asarray(norm.scale[...]) + np.asarray(
            norm.bias[...]
        )

    p = model.patch_size
    n, hh, ww, c = x.shape
    patches = x.reshape(n, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    stem = np.asarray(model.stem.kernel[...])  # (p, p, 3, h)
    y = np.einsum("nijabc,abcd->nijd", patches, stem) + np.asarray(model.stem.bias[...])
    y = bn(gelu(y), model.stem_norm)
    for block in model.blocks:
        kern = np.asarray(block.depthwise.kernel[...])[:, :, 0, :]
        k = kern.shape[0]
        lo, hi = (k - 1) // 2, k // 2
        padded = np.pad(y, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
        dw = np.zeros_like(y)
        for a in range(k):
            for b in range(k):
                dw += padded[:, a : a + y.shape[1], b : b + y.shape[2]] * kern[a, b]
        dw += np.asarray(block.depthwise.bias[...])
        y = y + bn(gelu(dw), block.norm1)
        pw = y @ np.asarray(block.pointwise.kernel[...])[0, 0] + np.asarray(
            block.pointwise.bias[...]
        )
        y = bn(gelu(pw), block.norm2)
    pooled = y.mean(axis=(1, 2))
    return pooled @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...])


@pytest.mark.parametrize("kernel_size", [3, 4])
def test_forward_matches_numpy_reference(kernel_size):
    model = convmixer_jax.create_model(
        "convmixer_tiny",
        num_classes=5,
        width=8,
        depth=2,
        kernel_size=kernel_size,
        rngs=nnx.Rngs(1),
    )
    # Non-trivial running statistics so eval-mode BatchNorm is really exercised.
    rng = np.random.default_rng(0)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.BatchStat):
            shape = var[...].shape
            var[...] = jnp.asarray(
                rng.uniform(0.5, 2.0, shape) if path[-1] == "var" else rng.normal(0, 0.3, shape),
                jnp.float32,
            )
    x = rng.normal(size=(2, 12, 16, 3)).astype(np.float32)
    got = np.asarray(model(jnp.asarray(x)))
    want = _numpy_forward(model, x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The eval-mode transform (BatchNorm folded into the convs) computes the same.
    fused = np.asarray(inference.reparameterize(model)(jnp.asarray(x)))
    np.testing.assert_allclose(fused, want, rtol=1e-4, atol=1e-5)


def test_train_mode_updates_batch_stats_with_momentum_09():
    model = convmixer_jax.create_model("convmixer_tiny", width=8, depth=1, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
    model(x, train=True)
    stem = jax.nn.gelu(model.stem(x) + model.stem.bias[...], approximate=False)
    batch_mean = jnp.mean(stem, axis=(0, 1, 2))
    np.testing.assert_allclose(model.stem_norm.mean[...], 0.1 * batch_mean, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params():
    model = convmixer_jax.create_model(
        "convmixer_tiny", width=8, depth=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
    )
    x = jnp.ones((2, 8, 8, 3))
    out = model(x)
    assert out.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ref = convmixer_jax.create_model("convmixer_tiny", width=8, depth=1, rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05)


def _loss_and_grads(model, x):
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss(params):
        m = nnx.merge(graphdef, params, stats, copy=True)
        out = m(x, train=True)
        return jnp.sum(out**2), nnx.state(m, nnx.BatchStat)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("scan, remat", [(True, "none"), (True, "block"), (False, "dots")])
def test_scan_and_remat_compute_the_same(scan, remat):
    kwargs = dict(num_classes=5, width=8, depth=3)
    reference = convmixer_jax.create_model("convmixer_tiny", scan=False, rngs=nnx.Rngs(2), **kwargs)
    model = convmixer_jax.create_model(
        "convmixer_tiny", scan=scan, remat=remat, rngs=nnx.Rngs(2), **kwargs
    )
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 3)), jnp.float32)
    (want_loss, want_stats), want_grads = _loss_and_grads(reference, x)
    (loss, stats), grads = _loss_and_grads(model, x)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    # Same variable layout whichever way the blocks run, so checkpoints load in both.
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model(x), reference(x), rtol=1e-5, atol=1e-6)


def test_scanned_blocks_update_each_blocks_batch_stats():
    model = convmixer_jax.create_model("convmixer_tiny", width=8, depth=3, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
    model(x, train=True)
    means = [np.asarray(b.norm1.mean[...]) for b in model.blocks]
    assert all(np.abs(m).sum() > 0 for m in means)
    assert not np.allclose(means[0], means[1]) and not np.allclose(means[1], means[2])


def test_forward_flops_match_published_macs():
    # REFERENCE: 51.10 GMACs for ConvMixer-1536/20 at 224 px, depthwise convs included.
    forward = flops.forward_flops(width=1536, depth=20, kernel_size=9, patch_size=7,
                                  num_classes=1000, image_size=224)  # fmt: skip
    assert forward / 2 / 1e9 == pytest.approx(51.10, abs=0.01)


def test_native_kernels_compute_the_same():
    # Both CPU kernels in a whole model, train mode: loss, every gradient and the statistics.
    kwargs = dict(num_classes=5, width=40, depth=2, kernel_size=5)
    reference = convmixer_jax.create_model(
        "convmixer_tiny", depthwise_impl="xla", pointwise_impl="xla", rngs=nnx.Rngs(3), **kwargs
    )
    model = convmixer_jax.create_model(
        "convmixer_tiny",
        depthwise_impl="native",
        pointwise_impl="native",
        remat="block",
        rngs=nnx.Rngs(3),
        **kwargs,
    )
    x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 12, 12, 3)), jnp.float32)
    (want_loss, want_stats), want_grads = _loss_and_grads(reference, x)
    (loss, stats), grads = _loss_and_grads(model, x)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_native_pointwise_rejects_remat_dots():
    with pytest.raises(ValueError, match="remat 'dots'.*pointwise_impl 'native'.*'block'"):
        convmixer_jax.create_model("convmixer_tiny", pointwise_impl="native", remat="dots")


def test_remat_dots_runs_xla_products():
    # On one CPU device 'auto' would be the kernels; 'dots' needs XLA's dot to see the products.
    model = convmixer_jax.create_model(
        "convmixer_tiny", pointwise_impl="auto", remat="dots", devices=jax.devices()[:1]
    )
    assert {block.pointwise.impl for block in model.blocks} == {"xla"}
    assert model.impls.depthwise == "native" and not model.impls.layers
