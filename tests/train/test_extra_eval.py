"""Extra eval sets (ImageNet-V2, ImageNet-ReaL): real TFDS builders on miniature local data."""

import json

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from flax import nnx
from test_imagenet import write_ilsvrc

from conftest import quickstart_config, run_cli
from convmixer_jax.data import datasets, input_pipeline, prepare
from convmixer_jax.train import checkpointing, config, loop, steps
from convmixer_jax.train.metrics import read_metrics

V2 = "imagenet_v2/matched-frequency"
EXTRA = f"{V2},imagenet2012_real"
NUM_V2 = 10  # ImageNet-V2 here holds the first 10 validation images, with their labels


def _real_sets(labels: list[int]) -> list[list[int]]:
    """ReaL label sets of the 12 validation images: singletons, multi-label, empty, every class."""
    sets = [[label] for label in labels[:4]]
    sets += [sorted({label, 7, 500}) for label in labels[4:8]]
    return sets + [[], [], list(range(1000)), list(range(1000))]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """imagenet2012, imagenet2012_real and imagenet_v2 prepared by their own TFDS builders from
    12 miniature validation images; only the two downloads are served from local files."""
    manual = write_ilsvrc(str(tmp_path_factory.mktemp("manual")))
    data_dir = str(tmp_path_factory.mktemp("tfds_extra"))
    imagenet = prepare.prepare("imagenet2012", manual, data_dir)
    val = sorted(
        (ex["file_name"].decode(), int(ex["label"]), ex["image"])
        for ex in tfds.as_numpy(
            imagenet.as_dataset(split="validation", decoders={"image": tfds.decode.SkipDecoding()})
        )
    )
    names, labels, images = zip(*val, strict=True)
    real = _real_sets(list(labels))
    downloads = tmp_path_factory.mktemp("downloads")
    (downloads / "real.json").write_text(json.dumps(real))
    v2_root = downloads / "imagenetv2-matched-frequency-format-val"
    for name, label, image in list(zip(names, labels, images, strict=True))[:NUM_V2]:
        (v2_root / str(label)).mkdir(parents=True, exist_ok=True)
        (v2_root / str(label) / name.replace(".JPEG", ".jpeg")).write_bytes(image)
    manager = tfds.download.DownloadManager
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manager, "download", lambda self, url: str(downloads / "real.json"))
        mp.setattr(manager, "download_and_extract", lambda self, url: str(downloads))
        prepare.prepare("imagenet2012_real", manual, data_dir)
        prepare.prepare(V2, None, data_dir)
    real_by_name = dict(zip(names, real, strict=True))
    return {"dir": data_dir, "names": names, "labels": labels, "real": real_by_name}


def _config(data_dir, **overrides):
    c = quickstart_config(data_dir, dataset="imagenet2012", image_size=16, batch_size=8,
                          eval_batch_size=8, extra_eval_datasets=EXTRA)  # fmt: skip
    c.update(overrides)
    return c


def test_real_top1_by_hand():
    # Predictions 2, 0, 1, 3, 1; the third image's set is empty and the last is padding.
    logits = jax.nn.one_hot(np.array([2, 0, 1, 3, 1]), 4) * 5.0
    sets = [{2, 3}, {1}, set(), {3}, {1}]
    real = np.array([[c in s for c in range(4)] for s in sets])
    sums = steps.real_sums(logits, real, np.array([1, 1, 1, 1, 0]))
    # Scored: images 0, 1, 3. Right: 0 (2 in {2,3}) and 3 (3 in {3}), so ReaL top-1 2/3.
    assert float(sums["real_top1"]) == 2.0 and float(sums["real_count"]) == 3.0


def test_extra_eval_names_are_validated():
    c = config.base_config()
    assert config.extra_eval_datasets(c) == {}
    c.extra_eval_datasets = f" {V2} , imagenet2012_real "
    assert config.extra_eval_datasets(c) == {
        "eval_imagenet_v2": V2, "eval_imagenet2012_real": "imagenet2012_real"}  # fmt: skip
    for bad, message in [
        ("ImageNet_V2", "not a TFDS name"),
        ("imagenet_v2/", "not a TFDS name"),
        (f"{V2},,imagenet2012_real", "'' is not a TFDS name"),
        ("imagenet v2", "not a TFDS name"),
        (f"{V2},imagenet_v2/topimages", "would both report as eval_imagenet_v2/"),
    ]:
        c.extra_eval_datasets = bad
        with pytest.raises(config.ConfigError, match=message):
            config.validate(c, 8)


def test_missing_or_mismatched_extra_sets_fail_before_compiling(data, synthetic_data_dir):
    ten_classes = _config(data["dir"], extra_eval_datasets=V2)
    ten_classes.model.num_classes = 10
    cases = [
        (quickstart_config(synthetic_data_dir, extra_eval_datasets=V2),
         rf"{V2} is not prepared in .*convmixer_jax.data.prepare {V2} --data_dir"),
        (quickstart_config(synthetic_data_dir, extra_eval_datasets="imagenet2012_real"),
         r"put ILSVRC2012_img_val.tar in .*manual.* --manual_dir"),
        (quickstart_config(synthetic_data_dir, extra_eval_datasets="no_such_set"),
         "no TFDS dataset 'no_such_set'"),
        (ten_classes, f"{V2} has 1000 classes, the model 10"),
    ]  # fmt: skip
    for c, message in cases:
        with pytest.raises(datasets.DataError, match=message):
            loop.setup(c)


def test_real_labels_reach_every_image_once_on_any_process_count(data, monkeypatch):
    c = _config(data["dir"])
    builder = datasets.extra_eval_builder("imagenet2012_real", c, 1000)
    assert datasets.default_eval_split(builder) == "validation"
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    seen, num_batches = [], set()
    for index in range(3):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        share = input_pipeline.process_split(builder, "validation", drop_remainder=False)
        records = list(share.records)
        batches = list(input_pipeline.as_numpy(
            input_pipeline.eval_dataset(builder, c, "validation", local_batch=3)))  # fmt: skip
        num_batches.add(len(batches))
        batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        n = len(records)
        assert batch["mask"][:n].all() and not batch["mask"][n:].any()
        assert not batch["real"][n:].any()
        for row, (_, label, name, ids) in zip(batch["real"], records, strict=False):
            name = name.numpy().decode()
            want = data["real"][name]
            assert sorted(ids.numpy().tolist()) == want
            assert np.flatnonzero(row).tolist() == want
            assert int(label) == data["labels"][data["names"].index(name)]
            seen.append(name)
    assert num_batches == {2} and sorted(seen) == sorted(data["names"])


def _predictions(c, workdir) -> dict[str, int]:
    """The restored model's top-1 class for every validation image, by file name."""
    exp = loop.setup(c)
    manager = checkpointing.create_manager(epath.Path(workdir) / "checkpoints", read_only=True)
    target = checkpointing.abstract_with_sharding(
        exp.setup.abstract_state, exp.setup.state_sharding
    )
    state, _ = checkpointing.restore_newest(manager, target, model_only=True, move_aside=False)
    manager.close()
    model = nnx.merge(exp.setup.graphdef, state["params"], state["batch_stats"])
    split = input_pipeline.process_split(exp.builder, "validation", drop_remainder=False)
    records = list(split.records)
    images = tf.stack([input_pipeline.eval_preprocess(r[0], c) for r in records]).numpy()
    predicted = np.argmax(model(jax.numpy.asarray(images), train=False), axis=-1)
    return {r[2].numpy().decode(): int(p) for r, p in zip(records, predicted, strict=True)}


def test_extra_sets_are_evaluated_in_training_and_eval_mode(data, tmp_path):
    workdir = str(tmp_path / "run")
    c = _config(data["dir"], num_train_steps=2, eval_every_steps=1, log_every_steps=1,
                checkpoint_every_steps=2)  # fmt: skip
    final = loop.train_and_evaluate(c, workdir)
    res = run_cli("--config", "configs/quickstart.py", "--workdir", workdir, "--mode", "eval",
                  "--config.dataset=imagenet2012", f"--config.data_dir={data['dir']}",
                  "--config.image_size=16", "--config.model.width=16", "--config.model.depth=2",
                  "--config.batch_size=8", "--config.eval_batch_size=8",
                  f"--config.extra_eval_datasets={EXTRA}")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [r for r in read_metrics(workdir) if "eval/top1" in r]
    assert [r["step"] for r in rows] == [1, 2, 2]  # periodic, final, --mode eval
    assert rows[-1] == pytest.approx(rows[1]) and rows[1] == pytest.approx({"step": 2, **final})

    # Expected values from the restored model's own predictions.
    predicted = _predictions(c, workdir)
    names, labels = data["names"], data["labels"]
    right = [predicted[n] == label for n, label in zip(names, labels, strict=True)]
    scored = [n for n in names if data["real"][n]]
    real_hits = [predicted[n] in data["real"][n] for n in scored]
    want = {
        "eval/top1": np.mean(right),
        "eval_imagenet_v2/top1": np.mean(right[:NUM_V2]),
        "eval_imagenet2012_real/top1": np.mean(right),
        "eval_imagenet2012_real/real_top1": np.mean(real_hits),
        "eval_imagenet2012_real/real_images": 10,
    }
    assert len(scored) == 10 and sum(real_hits) >= 2  # the every-class sets always count
    assert {k: rows[-1][k] for k in want} == pytest.approx(want, abs=1e-6)
    expected_keys = {f"{p}/{k}" for p in ("eval", "eval_imagenet_v2", "eval_imagenet2012_real")
                     for k in ("top1", "top5", "loss")}  # fmt: skip
    expected_keys |= {"eval_imagenet2012_real/real_top1", "eval_imagenet2012_real/real_images"}
    assert set(rows[-1]) == {"step"} | expected_keys
