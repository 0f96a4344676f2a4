"""python -m convmixer_jax.benchmark: the model figures, on a small ConvMixer (aot: test_aot.py)."""

import importlib.util

import jax
import pytest

from conftest import ROOT
from convmixer_jax import benchmark
from convmixer_jax.model import registry
from convmixer_jax.model.flops import forward_flops


def _small_config(image_size=16, **model):
    """configs/quickstart.py with a smaller ConvMixer (k3), as --config.model.X=... sets it."""
    spec = importlib.util.spec_from_file_location("quickstart", f"{ROOT}/configs/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.update(width=16, depth=2, kernel_size=3)
    c.model.update(model)
    c.image_size, c.batch_size = image_size, 8
    return c


def test_model_figures():
    config = _small_config()
    out = benchmark.benchmark_model(config, steps=1, repeats=1, peak_tflops=2.0)
    flops = forward_flops(
        width=16, depth=2, kernel_size=3, patch_size=2, num_classes=10, image_size=16
    )
    assert out["model_flops_per_image"] == flops
    assert out["train_images_per_sec"] > 0 and out["infer_images_per_sec"] > 0
    per_device = 3 * flops * out["train_images_per_sec"] / 1e12 / 8
    assert out["train_tflops_per_sec"] == pytest.approx(per_device)
    assert out["mfu"] == pytest.approx(out["train_tflops_per_sec"] / 2.0)
    assert out["device_count"] == 8 and out["device_kind"] == jax.devices()[0].device_kind
    assert out["peak_memory_bytes"] > 0 and out["compile_seconds"] > 0
    # What ran, not what was asked: on 8 simulated devices 'auto' takes the XLA-side paths.
    assert (out["depthwise_impl"], out["pointwise_impl"]) == ("shift", "xla")


@pytest.mark.parametrize("remat,pointwise_impl", [("none", "native"), ("dots", "xla")])
def test_figures_name_the_implementations_that_ran(remat, pointwise_impl):
    # As on one CPU device with a compiler: 'auto' is the kernels, but XLA's dot under 'dots'.
    config = _small_config(remat=remat)
    impls = registry.from_config(config, 10, 0, devices=jax.devices()[:1]).impls
    run = {"compile_seconds": 1.0, "peak_memory_bytes": 1, "impls": impls}
    out = benchmark.model_figures(config, run, 0.5, 0.25)
    assert (out["depthwise_impl"], out["pointwise_impl"]) == ("native", pointwise_impl)
    assert out["train_images_per_sec"] == 16 and out["infer_images_per_sec"] == 32
    assert out["mfu"] is None  # no known peak for CPUs
