"""ops.depthwise_conv's 'shift' and 'native' against XLA's grouped conv: values, gradients,
dtypes, memory; the native kernels' build, sharded use and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convmixer_jax import ops
from convmixer_jax.ops import policy, shift
from convmixer_jax.ops.cpu import native

depthwise_conv = ops.depthwise_conv

# (k, NHWC): odd and even k, k=1, H != W, k larger than the image, batches the chunk of 4 that
# `chunked` forces does not divide (and one smaller than it), channels split in two unequal halves
# for the forward tap sum (C >= 32, odd).
CASES = [
    (1, (5, 4, 7, 3)),
    (2, (6, 5, 8, 4)),
    (3, (9, 6, 5, 8)),
    (4, (9, 5, 7, 3)),
    (5, (5, 9, 6, 4)),
    (7, (6, 8, 9, 3)),
    (7, (2, 4, 5, 2)),
    (9, (5, 10, 12, 3)),
    (3, (5, 6, 5, 33)),
    (6, (3, 9, 8, 40)),
    # native: several 32-channel blocks with a partial last one, rows of 8 columns plus a tail,
    # and enough images for the weight gradient to be summed over image groups.
    (5, (9, 7, 19, 70)),
    # native: k 3 and 7 with whole 8-column runs (the kernel row held in registers)
    (3, (2, 6, 16, 24)),
    (7, (2, 9, 17, 40)),
]


@pytest.fixture
def chunked(monkeypatch):
    """Force 4-image chunks in the weight-gradient loop of the 'shift' implementation."""

    def set_for(shape: tuple[int, ...]) -> None:
        budget = 4 * 4 * int(np.prod(shape[1:]))
        monkeypatch.setattr(shift, "_WGRAD_CHUNK_BYTES", budget)

    return set_for


def _inputs(k: int, shape: tuple[int, ...], seed: int = 0):
    # NumPy's generator: jax.random would compile a sampler for every shape.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, np.float32)
    kernel = rng.standard_normal((k, k, 1, shape[-1]), np.float32) / k
    g = rng.standard_normal(shape, np.float32)
    return jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(g)


def _value_and_grads(impl: str):
    """jit: (conv output, d/dx and d/dkernel of sum(out * g))."""

    def f(x, kernel, g):
        out, vjp = jax.vjp(lambda x, w: depthwise_conv(x, w, impl=impl), x, kernel)
        return (out, *vjp(g.astype(out.dtype)))

    return jax.jit(f)


@pytest.mark.parametrize("impl", ["shift", "native"])
@pytest.mark.parametrize("k,shape", CASES)
def test_matches_xla(impl, k, shape, chunked):
    chunked(shape)
    x, kernel, g = _inputs(k, shape)
    want = _value_and_grads("xla")(x, kernel, g)
    got = _value_and_grads(impl)(x, kernel, g)
    for name, a, b in zip(("out", "dx", "dkernel"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        rtol = 1e-5 if name == "out" else 1e-4
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 10, err_msg=name)


def test_shift_matches_xla_default_chunks_and_grad():
    # Default chunk sizes and jax.grad of a scalar loss.
    x, kernel, g = _inputs(5, (3, 8, 6, 16), seed=1)

    def loss(impl):
        return jax.jit(
            jax.value_and_grad(
                lambda x, w: jnp.sum(depthwise_conv(x, w, impl=impl) * g), argnums=(0, 1)
            )
        )

    (lx, (gx, gw)), (ls, (sx, sw)) = loss("xla")(x, kernel), loss("shift")(x, kernel)
    np.testing.assert_allclose(ls, lx, rtol=1e-5)
    np.testing.assert_allclose(sx, gx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sw, gw, rtol=1e-4, atol=1e-3)


def test_eager_matches_jit():
    x, kernel, _ = _inputs(2, (2, 3, 4, 2))
    eager = depthwise_conv(x, kernel, impl="shift")
    jitted = jax.jit(lambda x, w: depthwise_conv(x, w, impl="shift"))(x, kernel)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", policy.DEPTHWISE)
def test_bfloat16(impl):
    x, kernel, g = _inputs(5, (6, 8, 7, 40), seed=2)  # 40 channels: the split forward too
    want = depthwise_conv(x, kernel, impl="xla")
    xb, wb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    out, dx, dw = _value_and_grads(impl)(xb, wb, g)
    assert out.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=0.05, atol=0.05)
    _, wdx, wdw = _value_and_grads("xla")(x, kernel, g)
    np.testing.assert_allclose(dx.astype(jnp.float32), wdx, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(dw.astype(jnp.float32), wdw, rtol=0.05, atol=1.0)


def test_bad_kernel_shape():
    x, kernel, _ = _inputs(3, (1, 4, 4, 2))
    with pytest.raises(ValueError, match="kernel"):
        depthwise_conv(x, kernel[..., :1], impl="shift")


def test_native_on_sharded_batch():
    # The custom call inside a jit whose batch is sharded over 8 devices: same loss and gradients.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    x, kernel, _ = _inputs(5, (16, 9, 7, 40), seed=3)
    sharded = jax.device_put(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    )

    def loss(impl):
        f = lambda x, w: jnp.sum(jnp.sin(depthwise_conv(x, w, impl=impl)))  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    (got, (gx, gw)), (want, (wx, ww)) = loss("native")(sharded, kernel), loss("xla")(x, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(gx, wx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw, ww, rtol=1e-4, atol=1e-4)


def test_native_build_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path))
    library = native.build()
    built = library.stat().st_mtime_ns
    assert native.build() == library  # the second call finds the library and builds nothing
    assert library.stat().st_mtime_ns == built
    assert list(tmp_path.iterdir()) == [library] and library.suffix == ".so"


def test_native_build_errors(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-c\\+\\+'.*'shift'.*'xla'"):
        native.build()
    # Where nothing builds, the policy's 'auto' takes the XLA paths and says why.
    monkeypatch.setattr(native, "load", native.load.__wrapped__)  # uncached: build again
    assert native.available.__wrapped__() is False
    assert "CPU kernels unavailable" in caplog.text and "no-such-c++" in caplog.text
    monkeypatch.delenv("CXX")
    broken = tmp_path / "broken.cc"
    broken.write_text("int f( {\n")
    monkeypatch.setattr(native, "SOURCES", (broken,))
    with pytest.raises(RuntimeError, match="broken.cc:1:.*error.*'shift'"):
        native.build()
    assert not list(tmp_path.glob("*.so"))  # nothing half-built left behind


def test_shift_backward_keeps_no_shifted_copies():
    # Naive autodiff of the shifted sum keeps ~k*k = 81 shifted copies of x for the backward (XLA
    # reports ~83x the input in temporaries here); the custom VJP keeps x and the kernel only.
    # Measured on CPU (jax 0.10.2): temp 3.7x the input (XLA's grouped conv: 3.0x); arguments and
    # outputs 1x each.
    shape, k = (8, 56, 56, 256), 9
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    kernel = jax.ShapeDtypeStruct((k, k, 1, shape[-1]), jnp.float32)
    grad = jax.grad(
        lambda x, w: jnp.sum(jnp.square(depthwise_conv(x, w, impl="shift"))), argnums=(0, 1)
    )
    stats = jax.jit(grad).lower(x, kernel).compile().memory_analysis()
    if stats is None:
        pytest.skip(f"no memory_analysis() on the {jax.default_backend()} backend")
    input_bytes = 4 * int(np.prod(shape))
    temp = stats.temp_size_in_bytes
    total = temp + stats.argument_size_in_bytes + stats.output_size_in_bytes
    assert temp < 5 * input_bytes, temp / input_bytes
    assert total < 8 * input_bytes, total / input_bytes
