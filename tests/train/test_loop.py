"""End to end: train, checkpoint, resume exactly, re-run a finished run, evaluate, CLI errors."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import quickstart_config, restore_params, run_cli, write_image_folder
from convmixer_jax.train import loop
from convmixer_jax.train.metrics import read_metrics


def test_train_resume_finish_and_eval(synthetic_data_dir, tmp_path):
    c = quickstart_config(synthetic_data_dir)
    workdir = str(tmp_path / "run")
    final = loop.train_and_evaluate(c, workdir)

    rows = read_metrics(workdir)
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 6, 9]
    assert [r["step"] for r in rows if "eval/top1" in r] == [6, 9]
    assert all(0 <= r["eval/top1"] <= r["eval/top5"] <= 1 for r in rows if "eval/top1" in r)
    assert rows[-1]["eval/top1"] == final["eval/top1"]
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == [3, 6, 9]
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    assert (
        json.load(open(os.path.join(workdir, "config.json")))["model"]["name"] == "convmixer_tiny"
    )
    lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    # train/lr is the rate of the last update of the interval (steps 2, 5, 8 of 0..8).
    knots = ([0, 3.6, 7.2, 9], [0, c.learning_rate, c.learning_rate / 20, 0])
    np.testing.assert_allclose(lrs, np.interp([2, 5, 8], *knots), rtol=1e-6)

    # Re-running a finished run does nothing.
    assert loop.train_and_evaluate(c, workdir) == {}
    assert len(read_metrics(workdir)) == len(rows)

    # --mode eval reproduces the final numbers.
    evaluated = loop.evaluate(c, workdir)
    for k, v in final.items():
        assert evaluated[k] == pytest.approx(v, rel=1e-6)

    # Losing the newest checkpoints resumes from step 3 and ends bit-identical at step 9.
    want = restore_params(workdir, 9)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    for step in (6, 9):
        shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
    again = loop.train_and_evaluate(c, resumed)
    got = restore_params(resumed, 9)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    assert again == final


def test_image_folder_end_to_end(tmp_path):
    root = write_image_folder(
        tmp_path / "images", {"train": {"a": 8, "b": 8, "c": 8}, "test": {"a": 3, "b": 2, "c": 2}}
    )
    c = quickstart_config(
        str(root),
        dataset="image_folder",
        batch_size=8,
        eval_batch_size=8,
        num_train_steps=2,
        cache_data=False,
    )
    metrics = loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert set(metrics) == {"eval/top1", "eval/top5", "eval/loss"}
    # 7 test images: every accuracy is a multiple of 1/7; three classes so top-5 is 1.
    assert metrics["eval/top1"] * 7 == pytest.approx(round(metrics["eval/top1"] * 7))
    assert metrics["eval/top5"] == 1.0


def test_cli_trains_and_evaluates(synthetic_data_dir, tmp_path):
    workdir = str(tmp_path / "cli")
    common = [
        "--config",
        "configs/quickstart.py",
        "--workdir",
        workdir,
        f"--config.data_dir={synthetic_data_dir}",
        "--config.model.width=16",
        "--config.model.depth=2",
        "--config.batch_size=32",
        "--config.num_train_steps=4",
    ]
    res = run_cli(*common)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step 4/4" in res.stderr
    final = read_metrics(workdir)[-1]
    res = run_cli(*common, "--mode", "eval")
    assert res.returncode == 0, res.stderr[-2000:]
    row = read_metrics(workdir)[-1]
    assert row["step"] == 4 and row["eval/top1"] == pytest.approx(final["eval/top1"])


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.image_size=33", "image_size: 33 is not a multiple of the patch size 2"),
        ("--config.model.name=convmixer_9", "model.name: unknown model 'convmixer_9'"),
        ("--config.batch_size=12", "batch_size: 12 is not a positive multiple of the 8 devices"),
        ("--config.dataset=mnist", "dataset: 'mnist' is unknown"),
        ("--config.num_train_steps=-1", "num_train_steps: must be >= 0"),
        ("--config.checkpoint=/nonexistent", "checkpoint path '/nonexistent' does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_error(flag, message, synthetic_data_dir, tmp_path):
    res = run_cli(
        "--config",
        "configs/quickstart.py",
        "--workdir",
        str(tmp_path),
        "--mode",
        "eval",
        f"--config.data_dir={synthetic_data_dir}",
        flag,
    )
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
