"""Mixup/CutMix against a NumPy version of timm's Mixup, and BatchNorm over groups of images."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

import convmixer_jax
from convmixer_jax.model import convmixer
from convmixer_jax.train import config as config_lib
from convmixer_jax.train import mixing, optim, steps

# --- A NumPy reference written from timm's definitions (Mixup, mode 'batch'). ---------------


def np_rand_bbox(height, width, lam, cy, cx):
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return y0, y1, x0, x1


def np_mixup_target(labels, num_classes, lam, smoothing):
    off = smoothing / num_classes
    y = np.full((len(labels), num_classes), off)
    y[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return y * lam + y[::-1] * (1.0 - lam)


def np_mix_one_batch(x, labels, lam, use_cutmix, cy, cx, num_classes, smoothing):
    """timm's Mixup._mix_batch on one (GPU) batch of NHWC images, then mixup_target."""
    x = x.astype(np.float64).copy()
    height, width = x.shape[1:3]
    if use_cutmix:
        y0, y1, x0, x1 = np_rand_bbox(height, width, lam, cy, cx)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        x[:, y0:y1, x0:x1] = x[::-1][:, y0:y1, x0:x1]
    else:
        x = x * lam + x[::-1] * (1.0 - lam)
    return x, np_mixup_target(labels, num_classes, lam, smoothing)


def np_mix(x, labels, params, group_size, num_classes, smoothing):
    size = group_size or len(x)
    outs = [
        np_mix_one_batch(
            x[g * size : (g + 1) * size],
            labels[g * size : (g + 1) * size],
            float(params.lam[g]),
            bool(params.use_cutmix[g]),
            int(params.center_y[g]),
            int(params.center_x[g]),
            num_classes,
            smoothing,
        )
        for g in range(len(x) // size)
    ]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def _params(lam, use_cutmix, cy, cx):
    return mixing.MixParams(
        jnp.asarray(lam, jnp.float32),
        jnp.asarray(use_cutmix),
        jnp.asarray(cy, jnp.int32),
        jnp.asarray(cx, jnp.int32),
    )


def _apply(params, x, labels, group_size, num_classes=7, smoothing=0.1):
    out = mixing.apply_mix(
        params,
        jnp.asarray(x),
        jnp.asarray(labels),
        num_classes=num_classes,
        label_smoothing=smoothing,
        group_size=group_size,
    )
    return jax.device_get(out)


@pytest.mark.parametrize(
    "group_size, params",
    [
        (4, ([0.3, 0.55], [False, True], [2, 9], [17, 1])),
        (2, ([0.9, 0.05, 0.62, 0.41], [True, False, True, True], [0, 11, 5, 6], [0, 19, 10, 3])),
        (0, ([0.7], [True], [4], [8])),
        (0, ([0.2], [False], [0], [0])),
    ],
)
def test_matches_numpy_reference(group_size, params):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 12, 20, 3)).astype(np.float32)
    labels = rng.integers(0, 7, 8)
    p = _params(*params)
    images, targets = _apply(p, x, labels, group_size)
    want_images, want_targets = np_mix(x, labels, p, group_size, 7, 0.1)
    np.testing.assert_allclose(images, want_images, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(targets, want_targets, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_lambda_corrected_for_clipped_box():
    # lam 0.36: cut side int(10 * 0.8) = 8, half 4. Centre (1, 9): rows 0..5, cols 5..10.
    x = np.zeros((2, 10, 10, 1), np.float32)
    x[1] = 1.0
    p = _params([0.36], [True], [1], [9])
    images, targets = _apply(p, x, np.array([0, 1]), 0, num_classes=2, smoothing=0.0)
    box = np.zeros((10, 10), bool)
    box[0:5, 5:10] = True
    np.testing.assert_array_equal(images[0, ..., 0], box.astype(np.float32))  # pasted from 1
    np.testing.assert_array_equal(images[1, ..., 0], (~box).astype(np.float32))
    lam = 1.0 - 25 / 100  # the clipped 5x5 box, not the drawn 0.36
    np.testing.assert_allclose(targets, [[lam, 1 - lam], [1 - lam, lam]], rtol=1e-6)
    # Unclipped (centre (5, 5): rows and cols 1..9): the area is 64 and lambda stays 0.36.
    _, targets = _apply(_params([0.36], [True], [5], [5]), x, np.array([0, 1]), 0, 2, 0.0)
    np.testing.assert_allclose(targets[0], [0.36, 0.64], rtol=1e-6)


def test_pairs_mirror_within_each_group():
    batch, group = 12, 4
    x = np.broadcast_to(np.arange(batch, dtype=np.float32)[:, None, None, None], (batch, 2, 2, 1))
    labels = np.arange(batch)
    p = _params([0.25, 0.6, 0.9], [False] * 3, [0] * 3, [0] * 3)
    images, targets = _apply(p, x, labels, group, num_classes=batch, smoothing=0.0)
    for i in range(batch):
        g, j = divmod(i, group)
        partner = g * group + group - 1 - j
        lam = [0.25, 0.6, 0.9][g]
        np.testing.assert_allclose(images[i], lam * i + (1 - lam) * partner, rtol=1e-6)
        want = np.zeros(batch)
        want[i] += lam
        want[partner] += 1 - lam
        np.testing.assert_allclose(targets[i], want, rtol=1e-6, atol=1e-7)


def test_label_smoothing_values_and_no_mixing_with_zero_alphas():
    x = np.random.default_rng(1).normal(size=(4, 3, 3, 3)).astype(np.float32)
    labels = np.array([3, 0, 9, 3])
    images, targets = mixing.mix_batch(
        jax.random.key(0),
        jnp.asarray(x),
        jnp.asarray(labels),
        num_classes=10,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        switch_prob=0.5,
        label_smoothing=0.1,
        group_size=0,
    )
    np.testing.assert_array_equal(images, x)
    want = np.full((4, 10), 0.01)
    want[np.arange(4), labels] = 1 - 0.1 + 0.01
    np.testing.assert_allclose(targets, want, rtol=1e-6)


def _draws(n, **kwargs):
    keys = jax.random.split(jax.random.key(42), n)
    draw = jax.jit(jax.vmap(lambda k: mixing.sample_params(k, 1, 12, 20, **kwargs)))
    return jax.tree.map(lambda a: np.asarray(a)[:, 0], draw(keys))


def test_switch_probability_and_beta_lambdas_over_many_keys():
    n = 20_000
    d = _draws(n, mixup_alpha=0.5, cutmix_alpha=2.0, switch_prob=0.3)
    frac = d.use_cutmix.mean()
    assert abs(frac - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    # Each mode draws from its own Beta(alpha, alpha).
    assert stats.kstest(d.lam[~d.use_cutmix], stats.beta(0.5, 0.5).cdf).pvalue > 1e-3
    assert stats.kstest(d.lam[d.use_cutmix], stats.beta(2.0, 2.0).cdf).pvalue > 1e-3
    # Box centres are uniform over the pixel grid.
    assert d.center_y.min() == 0 and d.center_y.max() == 11
    assert d.center_x.min() == 0 and d.center_x.max() == 19
    assert abs(d.center_x.mean() - 9.5) < 0.2


def test_only_one_mode_when_the_other_alpha_is_zero():
    mix = _draws(500, mixup_alpha=0.5, cutmix_alpha=0.0, switch_prob=0.9)
    cut = _draws(500, mixup_alpha=0.0, cutmix_alpha=0.5, switch_prob=0.1)
    assert not mix.use_cutmix.any() and cut.use_cutmix.all()
    assert 0.4 < mix.lam.mean() < 0.6 and 0.4 < cut.lam.mean() < 0.6


MIX_KW = {"mixup_alpha": 0.5, "cutmix_alpha": 0.5, "switch_prob": 0.5}
_mix = jax.jit(
    functools.partial(mixing.mix_batch, num_classes=10, label_smoothing=0.1, group_size=4, **MIX_KW)
)
X = np.random.default_rng(3).normal(size=(32, 6, 6, 3)).astype(np.float32)
LABELS = np.arange(32) % 10


def test_deterministic_from_the_key():
    a, b, c = (_mix(jax.random.key(k), X, LABELS) for k in (7, 7, 8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[1], c[1])


@pytest.mark.parametrize("group_size", [4, 2, 8, 16])
def test_sharded_batch_matches_numpy_reference_of_the_drawn_params(group_size):
    """32 images on 8 devices (4 each): groups inside a device, and groups spanning 2 and 4."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = NamedSharding(mesh, P("data"))
    key = jax.random.key(3)
    mix = jax.jit(
        functools.partial(
            mixing.mix_batch, num_classes=10, label_smoothing=0.1, group_size=group_size, **MIX_KW
        )
    )
    images, targets = mix(key, jax.device_put(X, data), jax.device_put(LABELS, data))
    groups = 32 // group_size
    params = mixing.sample_params(key, groups, 6, 6, **MIX_KW)
    if groups >= 8:
        assert 0 < int(params.use_cutmix.sum()) < groups  # both modes occur in this draw
    want_images, want_targets = np_mix(X, LABELS, params, group_size, 10, 0.1)
    np.testing.assert_allclose(images, want_images, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(targets, want_targets, rtol=1e-6, atol=1e-7)


# --- The train step with mixing and grouped BatchNorm. ---------------------------------------


def _setup(bn_group_size: int):
    model = convmixer_jax.create_model(
        "convmixer_tiny",
        num_classes=10,
        width=8,
        depth=1,
        bn_group_size=bn_group_size,
        rngs=nnx.Rngs(0),
    )
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optim.create_optimizer(config_lib.base_config(), optim.onecycle_schedule(0.01, 10))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    return graphdef, steps.init_train_state(params, batch_stats, tx), batch, tx


MIX = mixing.MixConfig(
    num_classes=10, mixup_alpha=0.5, cutmix_alpha=0.5, switch_prob=0.5, group_size=4
)


def _train(devices, mix: mixing.MixConfig | None, bn_group_size: int):
    graphdef, state, batch, tx = _setup(bn_group_size)
    step = functools.partial(
        steps.train_step, graphdef=graphdef, tx=tx, label_smoothing=0.1, mixing=mix, seed=5
    )
    mesh = jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put(state, repl)
    fn = jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl))
    losses = []
    for _ in range(2):
        state, metrics = fn(state, jax.device_put(batch, data))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), np.array(losses)


def test_train_step_mixes_and_eight_devices_equal_one():
    s8, l8 = _train(jax.devices(), MIX, bn_group_size=4)
    s1, l1 = _train(jax.devices()[:1], MIX, bn_group_size=4)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s8), jax.tree.leaves(s1), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    # The first step's loss without mixing, from the same initial state:
    graphdef, state, batch, _ = _setup(4)
    logits = nnx.merge(graphdef, state["params"], state["batch_stats"])(batch["image"], train=True)
    plain = jnp.mean(steps.cross_entropy(logits, steps.soft_targets(batch["label"], 10, 0.1)))
    assert abs(l8[0] - float(plain)) > 1e-3  # the mixed batch gives another loss


def test_train_step_loss_uses_mixed_targets_and_top1_the_true_labels():
    graphdef, state, batch, tx = _setup(0)
    state["step"] = jnp.asarray(3, jnp.int32)
    key = jax.random.fold_in(jax.random.key(5), 3)  # the seed and the step
    images, _ = mixing.mix_batch(
        key, batch["image"], batch["label"], label_smoothing=0.1, **vars(MIX)
    )
    model = nnx.merge(graphdef, state["params"], state["batch_stats"], copy=True)
    logits = model(images, train=True)
    # Labels the model predicts on the mixed images: top-1 against them must be exactly 1.
    batch["label"] = np.asarray(jnp.argmax(logits, -1), np.int32)
    _, targets = mixing.mix_batch(
        key, batch["image"], batch["label"], label_smoothing=0.1, **vars(MIX)
    )
    step = functools.partial(
        steps.train_step, graphdef=graphdef, tx=tx, label_smoothing=0.1, mixing=MIX, seed=5
    )
    _, metrics = jax.jit(step)(state, batch)
    want = jnp.mean(steps.cross_entropy(logits, targets))
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    assert float(metrics["top1"]) == 1.0
    assert np.abs(np.asarray(targets).max(-1) - 0.91).max() > 0.1  # the targets are mixed


# --- BatchNorm statistics over groups of images. ---------------------------------------------


def _bn(group_size, features=5):
    bn = convmixer.BatchNorm(
        features, group_size=group_size, impl="xla", dtype=None, rngs=nnx.Rngs(0)
    )
    rng = np.random.default_rng(4)
    bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, features), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.normal(size=features), jnp.float32)
    bn.mean[...] = jnp.asarray(rng.normal(size=features), jnp.float32)
    bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32)
    return bn


def _normalise(bn, x, train: bool):
    """The BatchNorm alone: its input taken as a conv output with zero bias, no activation."""
    return bn(x, jnp.zeros(x.shape[-1]), "identity", train)


def test_group_batch_norm_matches_numpy_per_group():
    bn = _bn(group_size=4)
    x = np.random.default_rng(5).normal(2.0, 3.0, size=(12, 3, 3, 5)).astype(np.float32)
    old_mean, old_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    y = np.asarray(_normalise(bn, jnp.asarray(x), True))
    groups = x.astype(np.float64).reshape(3, 4, 3, 3, 5)
    mean = groups.mean(axis=(1, 2, 3), keepdims=True)
    var = groups.var(axis=(1, 2, 3), keepdims=True)  # biased, as Flax
    want = (groups - mean) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(
        bn.bias[...]
    )
    np.testing.assert_allclose(y, want.reshape(x.shape), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        bn.mean[...], 0.9 * old_mean + 0.1 * mean.mean(axis=(0, 1, 2, 3)).ravel(), rtol=1e-5
    )
    np.testing.assert_allclose(
        bn.var[...], 0.9 * old_var + 0.1 * var.mean(axis=(0, 1, 2, 3)).ravel(), rtol=1e-5
    )
    # Eval mode uses the running statistics, whatever the group size.
    y_eval = np.asarray(_normalise(bn, jnp.asarray(x), False))
    want_eval = (x - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + 1e-5)
    want_eval = want_eval * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
    np.testing.assert_allclose(y_eval, want_eval, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [2, 4, 8, 16])
def test_sharded_group_statistics_match_numpy(group_size):
    """32 images on 8 devices (4 each), groups inside a device and spanning 2 or 4 of them."""
    bn = _bn(group_size=group_size)
    graphdef, variables = nnx.split(bn)
    x = np.random.default_rng(8).normal(1.0, 2.0, size=(32, 3, 3, 5)).astype(np.float32)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def train_mode(variables, x):
        bn = nnx.merge(graphdef, variables)
        return _normalise(bn, x, True), nnx.state(bn)

    fn = jax.jit(train_mode, in_shardings=(None, NamedSharding(mesh, P("data"))))
    y, new = fn(variables, jax.device_put(x, NamedSharding(mesh, P("data"))))
    groups = x.astype(np.float64).reshape(32 // group_size, group_size, 3, 3, 5)
    mean = groups.mean(axis=(1, 2, 3), keepdims=True)
    var = groups.var(axis=(1, 2, 3), keepdims=True)
    scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
    want = (groups - mean) / np.sqrt(var + 1e-5) * scale + bias
    np.testing.assert_allclose(y, want.reshape(x.shape), rtol=1e-4, atol=1e-5)
    want_mean = 0.9 * np.asarray(bn.mean[...]) + 0.1 * mean.mean(axis=(0, 1, 2, 3)).ravel()
    np.testing.assert_allclose(new["mean"][...], want_mean, rtol=1e-5)


def test_group_size_zero_is_plain_flax_batch_norm():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(8, 3, 3, 5)), jnp.float32)
    ours = _bn(group_size=0)
    flax_bn = nnx.BatchNorm(5, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    nnx.update(flax_bn, nnx.state(ours))
    for train in (True, False):
        np.testing.assert_array_equal(
            _normalise(ours, x, train), flax_bn(x, use_running_average=not train)
        )
    np.testing.assert_array_equal(ours.mean[...], flax_bn.mean[...])
    np.testing.assert_array_equal(ours.var[...], flax_bn.var[...])


def test_group_batch_norm_rejects_a_batch_it_does_not_divide():
    with pytest.raises(ValueError, match="does not divide"):
        _normalise(_bn(group_size=3), jnp.ones((8, 2, 2, 5)), True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_model_with_one_group_equals_global_batch_norm(dtype):
    x = jnp.asarray(np.random.default_rng(7).normal(size=(8, 8, 8, 3)), jnp.float32)

    def run(group_size):
        model = convmixer_jax.create_model(
            "convmixer_tiny",
            width=8,
            depth=1,
            dtype=dtype,
            bn_group_size=group_size,
            rngs=nnx.Rngs(0),
        )
        logits = model(x, train=True)
        return np.asarray(logits, np.float32), jax.device_get(nnx.state(model, nnx.BatchStat))

    (base, base_stats), (one, one_stats), (four, _) = run(0), run(8), run(4)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(one, base, rtol=tol, atol=tol)
    for a, b in zip(jax.tree.leaves(one_stats), jax.tree.leaves(base_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=1e-6 if dtype == jnp.float32 else 1e-4)
    assert not np.allclose(four, base, atol=1e-3)  # per-group statistics change the output


def test_config_validation():
    c = config_lib.base_config()
    config_lib.validate(c, 8)
    for key, value, message in [
        ("mixup_alpha", -0.1, "mixup_alpha"),
        ("cutmix_alpha", -1.0, "cutmix_alpha"),
        ("mixup_switch_prob", 1.5, "mixup_switch_prob"),
        ("mixup_group_size", 48, "divide batch_size 640"),
        ("bn_group_size", -64, "bn_group_size"),
    ]:
        bad = config_lib.base_config()
        bad[key] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate(bad, 8)
    assert mixing.from_config(c, 10) is None
    c.cutmix_alpha, c.mixup_group_size = 0.5, 64
    assert mixing.from_config(c, 10) == mixing.MixConfig(10, 0.0, 0.5, 0.5, 64)
