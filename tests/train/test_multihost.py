"""Scale-out: fsdp equals replicated, and two real processes equal one through the CLI."""

import os
import socket
import subprocess

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ROOT, cli_command, quickstart_config, restore_params, write_image_folder
from convmixer_jax.train import loop, sharding
from convmixer_jax.train.metrics import read_metrics


def test_fsdp_equals_replicated(synthetic_data_dir, tmp_path):
    results = {}
    for mode in ("replicated", "fsdp"):
        c = quickstart_config(synthetic_data_dir, sharding=mode, num_train_steps=3)
        results[mode] = loop.train_and_evaluate(c, str(tmp_path / mode))
    for k, v in results["replicated"].items():
        assert results["fsdp"][k] == pytest.approx(v, rel=1e-5, abs=1e-6)
    a = restore_params(str(tmp_path / "replicated"), 3)
    b = restore_params(str(tmp_path / "fsdp"), 3)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_fsdp_shards_large_arrays():
    mesh = sharding.create_mesh()
    assert sharding.fsdp_sharding(mesh, (5, 5, 1, 16)).spec == P(None, None, None, "data")
    assert sharding.fsdp_sharding(mesh, (16, 24)).spec == P(None, "data")
    assert sharding.fsdp_sharding(mesh, (10,)).spec == P()  # 10 % 8 != 0: replicated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _flags(root, workdir, steps, *extra):
    # Full-dataset batches (32 textured images, random crops and flips): the global batch is the
    # same set of examples however the processes split the data, and each example is augmented
    # with a key from its index in the split, so one and two processes compute the same thing.
    return [
        "--config", "configs/quickstart.py", "--workdir", str(workdir),
        "--config.dataset=image_folder", f"--config.data_dir={root}",
        "--config.model.width=16", "--config.model.depth=2", "--config.image_size=16",
        "--config.batch_size=32", "--config.eval_batch_size=8",
        f"--config.num_train_steps={steps}", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1", "--config.eval_every_steps=0", *extra,
    ]  # fmt: skip


def _run_two_processes(args):
    port = _free_port()
    procs = [
        subprocess.Popen(
            cli_command(
                *args,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=_env(4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return errs


def _run_one_process(args):
    res = subprocess.run(
        cli_command(*args), cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]


def test_two_processes_equal_one_on_the_same_global_batches(tmp_path):
    root = write_image_folder(
        tmp_path / "images",
        {"train": {c: 8 for c in "abcd"}, "test": {"a": 3, "b": 3, "c": 2, "d": 3}},
        size=(16, 16),
        textured=True,
    )
    one, two = tmp_path / "one", tmp_path / "two"
    # Train 2 steps, then resume to 4, then evaluate: the same sequence on both layouts.
    for steps in (2, 4):
        _run_one_process(_flags(root, one, steps))
        errs = _run_two_processes(_flags(root, two, steps))
    assert "Resumed from" in errs[0] and "at step 2" in errs[0]
    _run_one_process(_flags(root, one, 4, "--mode=eval"))
    _run_two_processes(_flags(root, two, 4, "--mode=eval"))

    rows_one, rows_two = read_metrics(str(one)), read_metrics(str(two))
    # Process 0 alone wrote metrics: exactly as many rows as the single-process run.
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        for k in r1:
            if k not in ("step", "train/images_per_sec"):
                assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-5), k
    # 11 test images counted exactly once: accuracies are multiples of 1/11.
    top1 = rows_two[-1]["eval/top1"]
    assert top1 * 11 == pytest.approx(round(top1 * 11))
    for x, y in zip(
        jax.tree.leaves(restore_params(str(one), 4)),
        jax.tree.leaves(restore_params(str(two), 4)),
        strict=True,
    ):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
