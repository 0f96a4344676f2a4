"""benchmarks/compare_pytorch.py: the PyTorch twin computes our logits; the JSON has the figures."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import ROOT
from convmixer_jax.model.convmixer import ConvMixer
from convmixer_jax.model.flops import forward_flops
from convmixer_jax.runtime import hostmem


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location(
        "compare_pytorch", f"{ROOT}/benchmarks/compare_pytorch.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("activation,k", [("gelu", 5), ("relu", 4)])
def test_torch_twin_matches_jax_logits(compare, activation, k):
    arch = dict(width=12, depth=1, kernel_size=k, patch_size=2, num_classes=5)
    model = ConvMixer(**arch, activation=activation, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    for path, stat in nnx.iter_graph(model):  # non-trivial running statistics
        if isinstance(stat, nnx.BatchStat):
            shift = 0.0 if path[-1] == "mean" else 1.0
            stat.set_value(jnp.asarray(shift + 0.3 * rng.random(stat.get_value().shape)))
    twin = compare.torch_from_jax(model, **arch, activation=activation)
    images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    for layout in (torch.contiguous_format, torch.channels_last):
        twin = twin.to(memory_format=layout)
        with torch.no_grad():
            got_eval = twin.eval()(x.contiguous(memory_format=layout)).numpy()
            got_train = twin.train()(x.contiguous(memory_format=layout)).numpy()
        want_eval = model(jnp.asarray(images), train=False)
        want_train = model(jnp.asarray(images), train=True)  # batch statistics, as PyTorch's
        np.testing.assert_allclose(got_eval, want_eval, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_train, want_train, rtol=1e-4, atol=1e-4)
    assert np.abs(got_eval - got_train).max() > 1e-3  # the statistics matter


def test_main_prints_both_figures_and_ratios(compare, capsys):
    compare.main(
        ["--config", f"{ROOT}/configs/cifar10.py", "--model", "convmixer_tiny",
         "--width", "16", "--depth", "1", "--kernel_size", "3", "--batch_size", "8",
         "--image_size", "8", "--steps", "1", "--repeats", "1", "--peak_tflops", "0.5"]
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["model"], out["width"], out["depth"], out["batch_size"]) == (
        "convmixer_tiny", 16, 1, 8,
    )  # fmt: skip
    assert out["dtype"] == "float32" and out["depthwise_impl"] == "shift"
    assert out["pointwise_impl"] == "xla"  # 8 simulated devices: the XLA paths
    assert sorted(out["pytorch"]) == ["eager_channels_last", "eager_nchw"]
    for figures in [out["jax"], *out["pytorch"].values()]:
        assert figures["train_images_per_sec"] > 0 and figures["infer_images_per_sec"] > 0
    for kind in ("train", "infer"):
        key = f"{kind}_images_per_sec"
        fastest = max(r[key] for r in out["pytorch"].values())
        ratios = out["ratios"]
        assert ratios[f"{kind}_vs_fastest_eager"] == pytest.approx(out["jax"][key] / fastest)
        for name, r in out["pytorch"].items():
            assert ratios[f"{kind}_vs"][name] == pytest.approx(out["jax"][key] / r[key])
    assert len(out["load_average_before"]) == 3 and out["torch_threads"] >= 1
    assert out["malloc"] == hostmem.mode()
    # Both on the CPU here: the same peak gives both sides' MFU; no GPU allocator to read.
    assert out["torch_device"] == "cpu" and out["jax"]["device_count"] == 8
    flops = forward_flops(
        width=16, depth=1, kernel_size=3, patch_size=2, num_classes=10, image_size=8
    )
    for figures, devices in [(out["jax"], 8), *((r, 1) for r in out["pytorch"].values())]:
        tflops = 3 * flops * figures["train_images_per_sec"] / 1e12 / devices
        assert figures["train_tflops_per_sec"] == pytest.approx(tflops)
        assert figures["mfu"] == pytest.approx(tflops / 0.5)
    assert out["jax"]["peak_memory_bytes"] > 0
    assert [r["peak_memory_bytes"] for r in out["pytorch"].values()] == [None, None]


def test_torch_device(compare, monkeypatch):
    assert compare.torch_device("auto") == "cpu" and compare.torch_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU here: install a CUDA build of torch"):
        compare.torch_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(compare.jax, "default_backend", lambda: "gpu")
    with pytest.raises(SystemExit, match=r"JAX sees 8 GPUs .* \(CUDA_VISIBLE_DEVICES=0\)"):
        compare.torch_device("auto")


def test_runs_without_the_input_pipeline_packages():
    """The benchmarks need none of TensorFlow, TFDS and clu (GPU images often lack them)."""
    code = f"""
import importlib.util, json, sys
for name in ("tensorflow", "tensorflow_datasets", "clu"):
    sys.modules[name] = None  # importing it now fails
spec = importlib.util.spec_from_file_location("compare", "{ROOT}/benchmarks/compare_pytorch.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)
out = compare.main(["--config", "{ROOT}/configs/convmixer_1536_20.py", "--width", "8",
                    "--depth", "1", "--patch_size", "4", "--batch_size", "8", "--image_size", "8",
                    "--steps", "1", "--repeats", "1"])
print(json.dumps([out["model"], out["jax"]["train_images_per_sec"] > 0]))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == ["convmixer_1536_20", True]
