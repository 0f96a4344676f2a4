"""Converted checkpoints in use: evaluation, fine-tuning with init_from, export of a trained run to
timm, and prediction on image files."""

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import torch_convmixer as tc
from PIL import Image

from conftest import quickstart_config
from convmixer_jax import convert as convert_cli
from convmixer_jax import predict
from convmixer_jax.data import datasets, input_pipeline
from convmixer_jax.model import registry
from convmixer_jax.train import loop
from convmixer_jax.weights import convert

# The quickstart's model as quickstart_config shrinks it (convmixer_tiny: k5, p2, GELU).
ARCH = {"width": 16, "depth": 2, "kernel_size": 5, "patch_size": 2, "activation": "gelu"}


def _torch_model(num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tc.TimmConvMixer(16, 2, 5, 2, num_classes, "gelu")
    return tc.randomize_batch_norms(model, seed)


def _convert(model: torch.nn.Module, directory) -> str:
    directory.mkdir()
    safetensors.torch.save_file(model.state_dict(), directory / "model.safetensors")
    out = str(directory / "converted")
    num_classes = model.head.out_features
    convert.convert(
        str(directory / "model.safetensors"), out, "convmixer_tiny", num_classes=num_classes, **ARCH
    )
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 10-class PyTorch model and its converted checkpoint."""
    model = _torch_model(10, seed=0)
    return model, _convert(model, tmp_path_factory.mktemp("ref") / "ten")


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value"): np.asarray(x)
        for p, x in leaves
    }


def test_eval_of_converted_checkpoint_matches_pytorch(reference, synthetic_data_dir, tmp_path):
    torch_model, converted = reference
    c = quickstart_config(synthetic_data_dir, checkpoint=converted)
    metrics = loop.evaluate(c, str(tmp_path / "eval"))

    builder = datasets.get_builder(c)
    split = datasets.eval_split(builder, c)
    ds = input_pipeline.eval_dataset(builder, c, split, local_batch=c.eval_batch_size)
    top1, top5, losses = [], [], []
    for batch in input_pipeline.as_numpy(ds):
        real = batch["mask"] == 1
        logits = torch.from_numpy(tc.logits(torch_model, batch["image"][real]))
        labels = torch.from_numpy(batch["label"][real]).long()
        top1 += (logits.argmax(-1) == labels).tolist()
        top5 += (logits.topk(5).indices == labels[:, None]).any(-1).tolist()
        losses += torch.nn.functional.cross_entropy(logits, labels, reduction="none").tolist()
    assert len(top1) == builder.info.splits[split].num_examples
    assert metrics["eval/top1"] == pytest.approx(np.mean(top1), abs=1e-9)
    assert metrics["eval/top5"] == pytest.approx(np.mean(top5), abs=1e-9)
    assert metrics["eval/loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_init_from_starts_from_the_weights(reference, synthetic_data_dir, tmp_path):
    _, ten = reference
    seven = _convert(_torch_model(7, seed=1), tmp_path / "seven")
    fresh = loop.initial_state(loop.setup(quickstart_config(synthetic_data_dir)))
    for source, new_head in ((seven, True), (ten, False)):
        exp = loop.setup(quickstart_config(synthetic_data_dir, init_from=source))
        state = loop.initial_state(exp)
        stored, got = convert.read_checkpoint(source), _flat(state)
        assert int(state["step"]) == 0
        for key, value in got.items():
            if key.startswith("params/head/") and new_head:
                np.testing.assert_array_equal(value, _flat(fresh)[key], err_msg=key)
            elif key.startswith(("params/", "batch_stats/")):
                np.testing.assert_array_equal(value, stored[key], err_msg=key)
            else:  # a fresh optimizer: the same as training from scratch
                np.testing.assert_array_equal(value, _flat(fresh)[key], err_msg=key)
        assert got["params/head/kernel"].shape == (16, 10)


def test_fine_tuned_run_exports_to_timm(reference, synthetic_data_dir, tmp_path):
    _, converted = reference
    c = quickstart_config(
        synthetic_data_dir, init_from=converted, num_train_steps=2, eval_every_steps=0
    )
    workdir = tmp_path / "run"
    loop.train_and_evaluate(c, str(workdir))
    model = registry.create_model("convmixer_tiny", checkpoint=str(workdir), **ARCH)
    before = convert.read_checkpoint(converted)["params/stem/kernel"]
    assert not np.array_equal(np.asarray(model.stem.kernel[...]), before)  # it trained

    exported = str(tmp_path / "run.safetensors")
    assert convert_cli.main(["--to", "timm", "--source", str(workdir), "--out", exported]) == 0
    timm_model = tc.TimmConvMixer(16, 2, 5, 2, 10, "gelu").eval()
    timm_model.load_state_dict(safetensors.torch.load_file(exported), strict=True)
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    want = tc.logits(timm_model, x)
    got = np.asarray(model(x, train=False))
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5


def _write_images(root) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, ext) in enumerate([((40, 52), "png"), ((32, 32), "png"), ((70, 30), "jpg")]):
        path = str(root / f"image_{i}.{ext}")
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_prints_top5_imagenet_classes(tmp_path, capsys):
    torch_model = _torch_model(1000, seed=2)
    with torch.no_grad():
        torch_model.head.weight.mul_(30.0)  # confident predictions, so probabilities differ
    converted = _convert(torch_model, tmp_path / "thousand")
    paths = _write_images(tmp_path)
    flags = [f"--{k}={v}" for k, v in ARCH.items()]
    argv = ["--model", "convmixer_tiny", "--checkpoint", converted, "--num_classes", "1000"]
    assert predict.main([*argv, *flags, "--batch_size", "2", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 * len(paths)

    names = predict.imagenet_class_names()
    assert len(names) == 1000 and names[0].startswith("tench") and names[999].startswith("toilet")
    images = predict.load_images(paths, predict.preprocess_config("convmixer_tiny"))
    model = registry.create_model(
        "convmixer_tiny", checkpoint=converted, num_classes=1000, **ARCH
    )
    jax_logits = np.asarray(model(images, train=False))
    torch_probs = torch.softmax(torch.from_numpy(tc.logits(torch_model, images)), -1).numpy()
    for i, path in enumerate(paths):
        block = lines[6 * i : 6 * i + 6]
        assert block[0] == path
        printed = [line.strip().split("  ", 1) for line in block[1:]]
        assert printed[0][1] == names[int(np.argmax(jax_logits[i]))]
        top5 = np.argsort(-torch_probs[i])[:5]
        assert [name for _, name in printed] == [names[j] for j in top5]
        np.testing.assert_allclose([float(p) for p, _ in printed], torch_probs[i][top5], atol=1e-4)
    assert float(lines[1].split()[0]) > 0.05  # not a flat distribution

    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    assert predict.main([*argv, *flags, str(tmp_path / "broken.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
