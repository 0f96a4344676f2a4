"""Fault injection: SIGKILL and SIGTERM through the real CLI, corrupt checkpoints, a mismatched
workdir, corrupt images, non-finite steps, and invalid configs."""

import functools
import os
import random
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convmixer_jax
from conftest import (
    ROOT,
    cli_command,
    quickstart_config,
    restore_params,
    run_cli,
    write_image_folder,
)
from convmixer_jax.data import datasets
from convmixer_jax.train import checkpointing, loop, optim, sharding, steps
from convmixer_jax.train import config as config_lib
from convmixer_jax.train.metrics import read_metrics

STEPS = 10


def _flags(data_dir, workdir):
    return [
        "--config", "configs/quickstart.py", "--workdir", str(workdir),
        f"--config.data_dir={data_dir}", "--config.model.width=16", "--config.model.depth=2",
        "--config.batch_size=32", "--config.eval_batch_size=200",
        f"--config.num_train_steps={STEPS}", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=2", "--config.eval_every_steps=0",
    ]  # fmt: skip


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(synthetic_data_dir, tmp_path_factory):
    """An uninterrupted CLI run: its final params and eval numbers."""
    workdir = tmp_path_factory.mktemp("reference")
    res = run_cli(*_flags(synthetic_data_dir, workdir))
    assert res.returncode == 0, res.stderr[-3000:]
    return restore_params(str(workdir), STEPS), read_metrics(str(workdir))[-1]


def _run_until_step(args, target):
    """Starts the CLI and returns it once it has logged a step >= `target` (or ended)."""
    proc = subprocess.Popen(
        cli_command(*args), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    for line in proc.stderr:
        if "] step " in line and int(line.split("] step ")[1].split("/")[0]) >= target:
            break
    return proc


def test_sigkill_at_random_points_then_resume_is_bit_exact(synthetic_data_dir, reference, tmp_path):
    want_params, want_eval = reference
    rng = random.Random(0)
    for trial in range(2):
        workdir = tmp_path / f"trial{trial}"
        args = _flags(synthetic_data_dir, workdir)
        for _ in range(2):  # two kills per trial, at random steps and random moments
            proc = _run_until_step(args, rng.randint(1, STEPS - 1))
            time.sleep(rng.uniform(0.0, 1.0))
            proc.kill()
            proc.wait()
            saved = (
                os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").exists() else []
            )
            leftovers = [d for d in saved if not d.isdigit()]
            # An interrupted save leaves at most a temporary directory, never a fake step.
            assert all("tmp" in d for d in leftovers), leftovers
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr[-3000:]
        _assert_same_params(restore_params(str(workdir), STEPS), want_params)
        assert read_metrics(str(workdir))[-1] == want_eval
        # Restarting the finished run only reports it.
        res = run_cli(*args)
        assert res.returncode == 0 and "Run already finished" in res.stderr


def test_sigterm_saves_the_current_step_and_exits_75(synthetic_data_dir, reference, tmp_path):
    workdir = tmp_path / "run"
    args = _flags(synthetic_data_dir, workdir)
    proc = _run_until_step(args, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    stopped = int(err.split("preempted at step ")[1].split(";")[0])
    assert 3 <= stopped < STEPS
    assert stopped in {int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()}
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Resumed from {workdir / 'checkpoints'} at step {stopped}" in res.stderr
    _assert_same_params(restore_params(str(workdir), STEPS), reference[0])


def _truncate_arrays(step_dir):
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            if "/d/" in path.replace(os.sep, "/") + "/" and os.path.getsize(path) > 16:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)


def test_truncated_newest_checkpoint_falls_back(synthetic_data_dir, tmp_path):
    c = quickstart_config(synthetic_data_dir)
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(c, workdir)
    want = restore_params(workdir, 9)
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", "9"))
    _truncate_arrays(os.path.join(copy, "checkpoints", "6", "model"))

    # Evaluation (read-only) falls back to step 3 and leaves the files alone.
    metrics = loop.evaluate(c, copy)
    assert read_metrics(copy)[-1]["step"] == 3 and "eval/top1" in metrics
    assert os.path.isdir(os.path.join(copy, "checkpoints", "6"))

    # Training moves the unreadable step aside, resumes from step 3, ends bit-identical.
    loop.train_and_evaluate(c, copy)
    assert os.path.isdir(os.path.join(copy, "checkpoints_unreadable", "6"))
    _assert_same_params(restore_params(copy, 9), want)

    # Nothing readable at all: stop, never start over.
    for step in os.listdir(os.path.join(copy, "checkpoints")):
        _truncate_arrays(os.path.join(copy, "checkpoints", step))
        shutil.rmtree(os.path.join(copy, "checkpoints", step, "train"))
    with pytest.raises(checkpointing.CheckpointError, match="no readable checkpoint"):
        loop.train_and_evaluate(c, copy)


def test_mismatched_workdir_names_the_arrays(synthetic_data_dir, tmp_path):
    workdir = tmp_path / "run"
    loop.train_and_evaluate(quickstart_config(synthetic_data_dir, num_train_steps=3), str(workdir))
    res = run_cli(*_flags(synthetic_data_dir, workdir), "--config.model.width=24")
    assert res.returncode == 2
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert "written for another model" in line
    assert "/blocks/0/norm1/mean has shape (16,), the config needs (24,)" in line
    assert "and 28 more" in line


def _corrupt_folder(root):
    write_image_folder(root, {"train": {"a": 6, "b": 6}, "test": {"a": 3, "b": 3}})
    jpeg = (root / "train" / "a" / "0.jpg").read_bytes()
    bad = {
        root / "train" / "a" / "truncated.jpg": jpeg[:-200],
        root / "train" / "b" / "garbage.jpg": b"this is not an image",
        root / "test" / "a" / "empty.png": b"",
    }  # fmt: skip
    for path, data in bad.items():
        path.write_bytes(data)
    return root


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = _corrupt_folder(tmp_path / "images")
    c = quickstart_config(str(root), dataset="image_folder", batch_size=8, eval_batch_size=8,
                          num_train_steps=4, log_every_steps=4, cache_data=False)  # fmt: skip
    metrics = loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert metrics["eval/skipped_images"] == 1  # 7 test files, 6 decodable
    row = [r for r in read_metrics(str(tmp_path / "run")) if "train/loss" in r][-1]
    # 4 steps x 8 images = 32 of 14 files (12 good): each bad file met at least twice.
    assert row["train/skipped_images"] >= 4


def test_corrupt_image_error_names_the_file(tmp_path):
    root = _corrupt_folder(tmp_path / "images")
    res = run_cli("--config", "configs/quickstart.py", "--workdir", str(tmp_path / "run"),
                  "--config.dataset=image_folder", f"--config.data_dir={root}",
                  "--config.bad_images=error", "--config.batch_size=8",
                  "--config.num_train_steps=4", "--config.cache_data=False")  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert "undecodable image" in line and ("truncated.jpg" in line or "garbage.jpg" in line)
    assert "bad_images='skip'" in line


def _tiny_state():
    model = convmixer_jax.create_model("convmixer_tiny", width=8, depth=1, rngs=nnx.Rngs(0))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optim.create_optimizer(config_lib.base_config(), lambda step: 0.01)
    state = steps.init_train_state(params, batch_stats, tx)
    return state, functools.partial(steps.train_step, graphdef=graphdef, tx=tx, label_smoothing=0)


def test_nonfinite_step_is_skipped_and_counted():
    state, step_fn = _tiny_state()
    images = jnp.ones((4, 8, 8, 3)).at[0, 0, 0, 0].set(jnp.nan)
    new, metrics = jax.jit(step_fn)(state, {"image": images, "label": jnp.zeros(4, jnp.int32)})
    assert float(metrics["nonfinite"]) == 1.0
    assert int(new["step"]) == 1 and int(new["skipped_steps"]) == 1
    for key in ("params", "batch_stats", "opt_state"):
        _assert_same_params(new[key], state[key])


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_injected_nan_in_training(mode, synthetic_data_dir, tmp_path, monkeypatch):
    real = sharding.global_batch
    calls = []

    def poisoned(mesh, local):  # the 5th training batch carries a NaN pixel
        calls.append(1)
        if len(calls) == 5 and "mask" not in local:
            local = dict(local, image=local["image"].copy())
            local["image"][0, 0, 0, 0] = np.nan
        return real(mesh, local)

    monkeypatch.setattr(sharding, "global_batch", poisoned)
    c = quickstart_config(synthetic_data_dir, nonfinite=mode)
    workdir = str(tmp_path / "run")
    if mode == "skip":
        loop.train_and_evaluate(c, workdir)
        row = [r for r in read_metrics(workdir) if "train/skipped_steps" in r][-1]
        assert row["step"] == 9 and row["train/skipped_steps"] == 1
        for leaf in jax.tree.leaves(restore_params(workdir, 9)):
            assert np.isfinite(leaf).all()
    else:
        with pytest.raises(loop.NonFiniteError, match="non-finite loss or gradients at step 5"):
            loop.train_and_evaluate(c, workdir)
        # The step-3 checkpoint is the newest and intact; nothing was saved after the NaN.
        assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
        for leaf in jax.tree.leaves(restore_params(workdir, 3)):
            assert np.isfinite(leaf).all()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.nonfinite=ignore"], "nonfinite: 'ignore' is unknown"),
        (["--config.model.patch_size=3"], "image_size: 32 is not a multiple of the patch size 3"),
        (["--config.dataset=image_folder", "--config.data_dir=/nonexistent"],
         "data_dir '/nonexistent' does not exist"),
        (["--config.batch_size=0"], "batch_size: 0 is not a positive multiple"),
    ],
)  # fmt: skip
def test_invalid_config_one_line(flags, message, synthetic_data_dir, tmp_path):
    res = run_cli("--config", "configs/quickstart.py", "--workdir", str(tmp_path),
                  f"--config.data_dir={synthetic_data_dir}", *flags)  # fmt: skip
    assert res.returncode == 2
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert message in line and "Traceback" not in res.stderr


def test_unwritable_workdir(synthetic_data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(config_lib.ConfigError, match="workdir: cannot write to"):
        loop.train_and_evaluate(quickstart_config(synthetic_data_dir), str(blocker / "run"))


def test_missing_dataset_error(tmp_path):
    with pytest.raises(datasets.DataError, match="downloads/manual"):
        loop.train_and_evaluate(
            quickstart_config(str(tmp_path), dataset="imagenet2012", image_size=32), str(tmp_path)
        )
