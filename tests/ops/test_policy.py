"""ops.policy: which implementation runs where, the one place 'auto' is resolved."""

import types

import jax
import jax.numpy as jnp
import pytest

from convmixer_jax.ops import policy
from convmixer_jax.ops.cpu import native

CPU = jax.devices()[:1]
EIGHT_CPUS = jax.devices()  # conftest: 8 simulated devices
TPUS = [types.SimpleNamespace(platform="tpu")] * 4
GPU = [types.SimpleNamespace(platform="gpu")]


def test_auto_on_one_cpu_is_the_kernels_in_float32():
    assert native.available()
    assert policy.resolve(devices=CPU) == policy.Impls("native", "native", True, False)
    # bfloat16: the depthwise kernel (float32 inside), XLA's product; scanned blocks.
    assert policy.resolve(dtype=jnp.bfloat16, devices=CPU) == policy.Impls("native", "xla")
    # remat 'dots' needs XLA's dot to see the pointwise products.
    assert policy.resolve(remat="dots", devices=CPU) == policy.Impls("native", "xla")
    assert policy.resolve(scan=False, devices=CPU).scan is False


def test_auto_on_several_cpus_or_without_kernels(monkeypatch):
    # A custom call would not be partitioned: on 8 devices every device would run all of it.
    assert policy.resolve(devices=EIGHT_CPUS) == policy.Impls("shift", "xla")
    monkeypatch.setattr(native, "available", lambda: False)
    assert policy.resolve(devices=CPU) == policy.Impls("shift", "xla")


def test_auto_on_accelerators_is_xla():
    for devices in (TPUS, GPU):
        for dtype in (jnp.float32, jnp.bfloat16):
            assert policy.resolve(dtype=dtype, devices=devices) == policy.Impls("xla", "xla")


def test_explicit_choices_and_errors():
    assert policy.resolve("xla", "xla", devices=CPU) == policy.Impls("xla", "xla")
    assert policy.resolve("shift", "native", devices=CPU) == policy.Impls("shift", "native")
    with pytest.raises(ValueError, match="unknown depthwise impl 'fft'; choose one of auto, xla"):
        policy.resolve("fft", devices=CPU)
    with pytest.raises(ValueError, match="unknown pointwise impl 'blas'.*xla, native"):
        policy.resolve(pointwise="blas", devices=CPU)
    with pytest.raises(ValueError, match="depthwise impl 'native' runs on CPU only; use 'auto'"):
        policy.resolve("native", devices=TPUS)
    with pytest.raises(ValueError, match="remat 'dots' cannot see pointwise_impl 'native'"):
        policy.resolve(pointwise="native", remat="dots", devices=CPU)
    with pytest.raises(ValueError, match="unknown remat 'all'"):
        policy.resolve(remat="all", devices=CPU)
