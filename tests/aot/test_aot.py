"""Ahead-of-time compiles: group layouts on 8 CPU devices judged from the optimised HLO, the HLO
readers, and `benchmark aot` for TPU and GPU targets through the compilers of .venv-aot."""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT
from convmixer_jax.aot import compile as aot
from convmixer_jax.aot import hlo, targets
from convmixer_jax.model.flops import forward_flops
from convmixer_jax.train import config as config_lib

AOT_PYTHON = os.path.join(ROOT, ".venv-aot", "bin", "python")


def _config(per_device: int, group: int):
    """A small ConvMixer with Mixup/CutMix and grouped BatchNorm, 8 devices x `per_device`."""
    c = config_lib.base_config()
    c.model.update(name="convmixer_tiny", width=32, depth=2, kernel_size=3)
    c.model.update(depthwise_impl="xla", pointwise_impl="xla")  # convolutions the HLO counts
    c.update(image_size=16, dtype="float32", num_classes=0, batch_size=8 * per_device)
    c.update(mixup_alpha=0.5, cutmix_alpha=0.5, mixup_group_size=group, bn_group_size=group)
    return c


@pytest.mark.parametrize("group", [2, 4, 8, 16], ids=["inside", "device", "span2", "span4"])
def test_groups_inside_or_spanning_devices_replicate_nothing(group):
    out = aot.figures(_config(4, group), aot.cpu_target(), jax.devices())
    assert out["devices"] == 8 and out["per_device_batch"] == 4
    assert out["flops_ratio_vs_one_device"] <= 1.15
    assert not out["activation_all_gather"]
    assert out["collectives"]["largest_all_gather_bytes"] < aot.activation_bytes(
        _config(4, group), 4
    )
    # XLA's CPU backend computes a depthwise weight gradient as a dense convolution.
    assert out["flops_per_device"] > out["model_train_flops_per_device"]
    if group > 4:  # statistics and partner images cross devices, nothing else
        assert out["collectives"]["all-reduce"] > 0 and out["collectives"]["collective-permute"]


def test_a_straddling_group_is_refused_and_would_gather_the_batch():
    c = _config(6, 4)  # groups of 4 over 6 images per device
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, 8)
    assert str(e.value) == (
        "mixup_group_size: groups of 4 straddle the 6 images of each of 8 devices (batch_size "
        "48); use 0 (the whole batch) or one of 6, 12, 24, 48"
    )
    # What the check prevents: compiled anyway, the step gathers images and activations.
    c = aot.pin_impls(c, jax.devices())
    text = aot.compile_steps(c, jax.devices())["train"].as_text()
    gathered = hlo.collectives(text)["largest_all_gather_bytes"]
    assert gathered >= aot.activation_bytes(c, 6)


def test_group_sizes_that_fit():
    assert config_lib.group_sizes(640, 16) == [1, 2, 4, 5, 8, 10, 20, 40, 80, 160, 320, 640]
    assert config_lib.group_sizes(640, 10) == [1, 2, 4, 8, 16, 32, 64, 128, 320, 640]
    assert 64 not in config_lib.group_sizes(640, 8)


def test_every_imagenet_layout_passes_the_group_check():
    for name in ("convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20"):
        spec = importlib.util.spec_from_file_location(name, f"{ROOT}/configs/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        default = module.get_config()
        config_lib.validate(default, 10)  # the paper's 10 devices x 64 images
        assert default.bn_group_size == default.mixup_group_size == 64
        for target in default.targets.split(","):
            c = module.get_config(target)
            config_lib.validate(c, targets.get(target).devices)
            assert c.target == target and c.batch_size == 640
        c = module.get_config("v9-1024")
        with pytest.raises(config_lib.ConfigError, match="target: this config is laid out for"):
            config_lib.validate(c, 8)


# --- Reading optimised HLO. ------------------------------------------------------------------

HLO = """HloModule m, is_scheduled=true

%body.1 (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %w = f32[8,8]{1,0} constant({...})
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %d = f32[4,8]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %d)
}

%cond.2 (p.1: (s32[], f32[4,8])) -> pred[] {
  %p.1 = (s32[], f32[4,8]{1,0}) parameter(0)
  %n = s32[] constant(5)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

%fused (a: bf16[2,6,6,3], k: bf16[3,3,1,3]) -> bf16[2,6,6,3] {
  %a = bf16[2,6,6,3]{3,2,1,0} parameter(0)
  %k = bf16[3,3,1,3]{3,2,1,0} parameter(1)
  ROOT %c = bf16[2,6,6,3]{3,2,1,0} convolution(%a, %k), window={size=3x3 pad=1_1x1_1}, \
dim_labels=b01f_01io->b01f, feature_group_count=3
}

ENTRY %main (x0: f32[4,8], im: bf16[2,6,6,3], kk: bf16[3,3,1,3]) -> f32[16,8] {
  %x0 = f32[4,8]{1,0} parameter(0)
  %im = bf16[2,6,6,3]{3,2,1,0} parameter(1)
  %kk = bf16[3,3,1,3]{3,2,1,0} parameter(2)
  %w0 = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond.2, body=%body.1
  %f = bf16[2,6,6,3]{3,2,1,0} fusion(%im, %kk), kind=kOutput, calls=%fused, \
backend_config={"estimated_cycles":"700"}
  %ags = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%x0), dimensions={0}
  %agd = f32[16,8]{1,0} all-gather-done(%ags)
  %ar = f32[8]{0} all-reduce(%y), to_apply=%add, backend_config={"estimated_cycles":"40"}
  ROOT %cb = f32[16,8]{1,0} custom-call(%agd), custom_call_target="ConcatBitcast"
}
""".replace("\\\n", "")


def test_hlo_flops_count_loops_dots_and_grouped_convolutions():
    dot = 2 * 4 * 8 * 8  # per iteration, 5 iterations from the loop condition
    # Depthwise 3x3 on 6x6 padded by 1: 16 of 18 (position, tap) pairs per axis read the image.
    conv = 2 * (2 * 3) * 16 * 16 * 1
    assert hlo.flops(HLO) == 5 * dot + conv


def test_hlo_convolution_flops_leave_out_padding():
    """A 1x1 convolution as the TPU compiler writes it (the kernel as lhs, the 4x4 activations
    as a window padded by 3): of each output's 4x4 window only one tap reads the input."""
    conv = (
        "ENTRY %m (a: f32[8,3,1,1], b: f32[2,4,4,8]) -> f32[2,4,4,3] {\n"
        "  %a = f32[8,3,1,1]{3,2,1,0} parameter(0)\n"
        "  %b = f32[2,4,4,8]{3,2,1,0} parameter(1)\n"
        "  ROOT %c = f32[2,4,4,3]{3,2,1,0} convolution(%a, %b), window={size=4x4 pad=3_3x3_3 "
        "rhs_reversal=1x1}, dim_labels=fb01_o01i->f01b\n}\n"
    )
    assert hlo.flops(conv) == 2 * (2 * 4 * 4 * 3) * 8  # images x pixels x outputs x inputs


def test_hlo_collectives_cycles_and_custom_calls():
    counts = hlo.collectives(HLO)
    assert counts["all-gather"] == 1 and counts["all-reduce"] == 1
    assert counts["largest_all_gather_bytes"] == 16 * 8 * 4
    assert hlo.tpu_cycles_by_kind(HLO) == {"depthwise": 700, "matmul": 0, "other": 40}
    assert hlo.custom_calls(HLO, "ConcatBitcast") == 1
    assert hlo.tpu_cycles_by_kind(HLO.replace("estimated_cycles", "x")) == {}


# --- TPU and GPU targets, through the compilers of .venv-aot (`make aot-env`). ----------------


def _aot(*args, timeout=900):
    assert os.path.exists(AOT_PYTHON), "no .venv-aot: run `make aot-env` (make test does)"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run(
        [AOT_PYTHON, "-m", "convmixer_jax.benchmark", "aot", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


SMALL = [
    "--config", f"{ROOT}/configs/quickstart.py", "--config.dtype=bfloat16",
    "--config.model.width=64", "--config.model.depth=3",
]  # fmt: skip


@pytest.mark.parametrize("target", ["v4-8", "v5e-16", "h100x8"])
def test_aot_compiles_for_tpu_and_gpu_targets(target):
    result = _aot(*SMALL, "--target", target, "--per_device_batch", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    t = targets.get(target)
    assert (out["target"], out["devices"], out["hbm_bytes"]) == (target, t.devices, t.hbm_bytes)
    kinds = {"v4-8": "TPU v4", "v5e-16": "TPU v5 lite", "h100x8": "NVIDIA H100 80GB HBM3"}
    assert out["device_kind"] == kinds[target]
    assert out["per_device_batch"] == 16 and out["global_batch"] == 16 * t.devices
    assert out["fits"] and 0 < out["peak_memory_bytes"] < 2**30
    assert out["flops_ratio_vs_one_device"] == pytest.approx(1.0, abs=0.05)
    forward = forward_flops(
        width=64, depth=3, kernel_size=5, patch_size=2, num_classes=10, image_size=32
    )
    assert out["model_train_flops_per_device"] == 3 * forward * 16
    assert 0.9 <= out["flops_per_device"] / out["model_train_flops_per_device"] <= 1.0
    assert not out["activation_all_gather"] and out["collectives"]["all-reduce"] > 0
    if t.platform == "tpu":
        assert out["estimated_block_seconds"] > 0 and out["estimated_step_seconds"] > 0
        assert out["estimated_step_seconds"] > 3 * out["estimated_block_seconds"] * 0.99
        assert 0 < out["estimated_mfu"] < 1
        assert sum(out["block_cycles_by_kind"].values()) > 0
    else:
        assert "estimated_step_seconds" not in out


def test_aot_reports_a_program_that_does_not_fit():
    # 2.1 G parameters with their AdamW moments: ~26 GB of state for a 16 GB chip.
    wide = [*SMALL, "--config.model.width=8192", "--config.model.depth=32"]
    result = _aot(*wide, "--target", "v5e-16", "--per_device_batch", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["fits"] is False and out["peak_memory_bytes"] is None
    assert "RESOURCE_EXHAUSTED" in out["compiler_error"] and "HBM" in out["compiler_error"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "v9-1"], "error: target: unknown target 'v9-1'; choose one of v4-8,"),
        ([], "error: target: pass --target NAME, or a config with one"),
        (
            ["--target", "v4-8", "--per_device_batch", "6", "--config.bn_group_size=4"],
            "error: bn_group_size: groups of 4 straddle the 6 images of each of 4 devices",
        ),
    ],
)
def test_aot_user_errors_are_one_line(args, message):
    result = _aot(*SMALL, *args, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]


def test_aot_without_the_compilers_names_the_fix():
    """In the training environment (no libtpu): one line saying where the compilers are."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-m", "convmixer_jax.benchmark", "aot", *SMALL,
         "--target", "v4-8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: target v4-8 needs libtpu; run `make aot-env` and use .venv-aot/bin/python, or "
        "pip install -e '.[aot]' in an environment of its own"
    )


def test_single_device_config_keeps_spanning_arithmetic():
    c = _config(4, 16)
    one = aot._single_device_config(c, 4)
    assert (one.batch_size, one.bn_group_size, one.mixup_group_size) == (4, 0, 0)
    assert copy.deepcopy(c).bn_group_size == 16  # the original is untouched
