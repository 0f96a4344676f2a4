"""Weight conversion: logits parity with an independent PyTorch ConvMixer, the file formats, named
errors, and the exact round trip through a timm .safetensors file."""

import argparse
import fractions
import sys

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import torch_convmixer as tc

from convmixer_jax import convert as convert_cli
from convmixer_jax.model import registry
from convmixer_jax.model.flops import count_params
from convmixer_jax.weights import convert

# (width, depth, kernel_size, patch_size, activation, input sizes): odd and even kernels.
TINY = [
    (16, 2, 5, 2, "gelu", [(16, 16), (10, 22)]),
    (12, 3, 4, 3, "relu", [(15, 21), (9, 9)]),
    (8, 2, 9, 7, "gelu", [(35, 28)]),
    (8, 1, 2, 1, "relu", [(7, 5)]),
]
CLASSES = 7


def _arch(width, depth, kernel, patch, activation, num_classes=CLASSES) -> dict:
    return {
        "width": width,
        "depth": depth,
        "kernel_size": kernel,
        "patch_size": patch,
        "activation": activation,
        "num_classes": num_classes,
    }


def _flags(arch: dict) -> list[str]:
    return [item for k, v in arch.items() for item in (f"--{k}", str(v))]


def _torch_args(arch: dict) -> tuple:
    keys = ("width", "depth", "kernel_size", "patch_size", "num_classes", "activation")
    return tuple(arch[k] for k in keys)


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _images(size: tuple[int, int], seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *size, 3)).astype(np.float32)


def _convert(source, out, arch: dict, *extra: str) -> int:
    argv = ["--model", "convmixer_tiny", "--source", str(source), "--out", str(out)]
    return convert_cli.main(argv + _flags(arch) + list(extra))


def _authors_checkpoint(model: torch.nn.Module) -> dict:
    """A training checkpoint as the authors' timm scripts save it (DataParallel names)."""
    return {
        "epoch": 149,
        "arch": "convmixer",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "args": argparse.Namespace(lr=0.01, batch_size=64),
        "metric": 81.37,
    }


@pytest.mark.parametrize("case", range(len(TINY)))
def test_converted_files_match_pytorch(case, tmp_path, capsys):
    *fields, sizes = TINY[case]
    arch = _arch(*fields)
    torch.manual_seed(case)
    timm_model = tc.randomize_batch_norms(tc.TimmConvMixer(*_torch_args(arch)), seed=case)
    authors = tc.randomize_batch_norms(tc.authors_convmixer(*_torch_args(arch)), seed=case + 10)
    safetensors.torch.save_file(timm_model.state_dict(), tmp_path / "model.safetensors")
    torch.save(timm_model.state_dict(), tmp_path / "pytorch_model.bin")
    torch.save(_authors_checkpoint(authors), tmp_path / "convmixer.pth.tar")
    sources = {
        "model.safetensors": timm_model,
        "pytorch_model.bin": timm_model,
        "convmixer.pth.tar": authors,
    }
    for i, (name, reference) in enumerate(sources.items()):
        out = tmp_path / f"converted_{i}"
        assert _convert(tmp_path / name, out, arch) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        model = registry.create_model("convmixer_tiny", checkpoint=str(out), **arch)
        for j, size in enumerate(sizes):
            x = _images(size, seed=j)
            error = _relative_error(np.asarray(model(x, train=False)), tc.logits(reference, x))
            assert error < 1e-5, (name, size, error)


@pytest.mark.parametrize(
    "name", ["convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20_ks9_p14"]
)
def test_released_variants_match_pytorch(name, tmp_path):
    """Full-size architectures: a timm file gives PyTorch's logits, and the same weights in the
    authors' naming convert to identical arrays."""
    spec = registry.get_spec(name)
    arch = _arch(spec.width, spec.depth, spec.kernel_size, spec.patch_size, spec.activation, 1000)
    torch.manual_seed(0)
    timm_model = tc.randomize_batch_norms(tc.TimmConvMixer(*_torch_args(arch)), seed=1)
    timm_file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(timm_model.state_dict(), timm_file)
    converted = convert.load_state_dict(convert.build(name), convert.read_state_dict(timm_file))
    assert count_params(converted) == sum(p.numel() for p in timm_model.parameters())
    x = _images((4 * spec.patch_size, 4 * spec.patch_size), seed=0, batch=1)
    assert _relative_error(np.asarray(converted(x)), tc.logits(timm_model, x)) < 1e-5

    authors = tc.authors_convmixer(*_torch_args(arch))  # same module order, other names
    authors.load_state_dict(
        dict(zip(authors.state_dict(), timm_model.state_dict().values(), strict=True))
    )
    authors_file = tmp_path / "convmixer.pth.tar"
    torch.save({"state_dict": authors.state_dict()}, authors_file)
    del timm_model, authors
    again = convert.load_state_dict(convert.build(name), convert.read_state_dict(authors_file))
    want, got = convert.variables(converted), convert.variables(again)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key].get_value(), want[key].get_value(), err_msg=key)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "state_dict_ema", "model"])
def test_reads_bare_and_wrapped_state_dicts(wrapper, tmp_path):
    model = tc.TimmConvMixer(*_torch_args(_arch(*TINY[0][:-1])))
    state = model.state_dict()
    if wrapper:
        state = {wrapper: {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(state, tmp_path / "w.pth")
    read = convert.read_state_dict(str(tmp_path / "w.pth"))
    assert read.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(read[key], value.numpy())


def test_round_trip_through_timm_file_is_exact(tmp_path, capsys):
    arch = _arch(*TINY[1][:-1])
    torch.manual_seed(5)
    original = tc.randomize_batch_norms(tc.TimmConvMixer(*_torch_args(arch)), seed=5)
    safetensors.torch.save_file(original.state_dict(), tmp_path / "in.safetensors")
    assert _convert(tmp_path / "in.safetensors", tmp_path / "ckpt", arch) == 0

    exported = tmp_path / "export" / "model.safetensors"
    argv = ["--to", "timm", "--source", str(tmp_path / "ckpt" / "0"), "--out", str(exported)]
    assert convert_cli.main(argv) == 0
    state = safetensors.numpy.load_file(str(exported))
    assert state.keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert state[key].dtype == np.int64 and state[key].shape == ()
        else:
            np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)
    reloaded = tc.TimmConvMixer(*_torch_args(arch)).eval()
    reloaded.load_state_dict(safetensors.torch.load_file(str(exported)), strict=True)
    x = _images((12, 12), seed=3)
    np.testing.assert_array_equal(tc.logits(reloaded, x), tc.logits(original, x))

    assert _convert(exported, tmp_path / "again", arch) == 0
    first = convert.read_checkpoint(str(tmp_path / "ckpt"))
    second = convert.read_checkpoint(str(tmp_path / "again"))
    assert first.keys() == second.keys() and len(first) == 12 * arch["depth"] + 8
    for key in first:
        np.testing.assert_array_equal(second[key], first[key], err_msg=key)
    capsys.readouterr()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_mismatched_files_name_every_bad_key(tmp_path, capsys):
    arch = _arch(*TINY[0][:-1])
    state = {k: v.numpy() for k, v in tc.TimmConvMixer(*_torch_args(arch)).state_dict().items()}
    del state["blocks.1.1.bias"]
    state["head.weight"] = np.zeros((CLASSES, 15), np.float32)
    state["extra.weight"] = np.zeros(3, np.float32)
    safetensors.numpy.save_file(state, tmp_path / "bad.safetensors")
    assert _convert(tmp_path / "bad.safetensors", tmp_path / "out", arch) == 2
    err = _error_line(capsys)
    assert "missing blocks.1.1.bias" in err and "unexpected extra.weight" in err
    assert "head.weight has shape (7, 15), the model needs (7, 16)" in err
    assert not (tmp_path / "out").exists()

    # The authors' names are reported as the file spells them (head = layer depth + 5 = 7).
    authors = tc.authors_convmixer(*_torch_args(arch)).state_dict()
    del authors["4.0.fn.0.weight"]
    authors["7.bias"] = torch.zeros(CLASSES + 1)
    torch.save(authors, tmp_path / "bad.pth.tar")
    assert _convert(tmp_path / "bad.pth.tar", tmp_path / "out", arch) == 2
    err = _error_line(capsys)
    assert "missing 4.0.fn.0.weight" in err and "7.bias has shape (8,)" in err

    # A file of another variant says what it holds.
    assert _convert(tmp_path / "bad.safetensors", tmp_path / "out", {**arch, "width": 32}) == 2
    assert "the file holds width 16, depth 2, kernel_size 5, patch_size 2" in _error_line(capsys)


def test_unreadable_sources_and_outputs(tmp_path, capsys, monkeypatch):
    arch = _arch(*TINY[0][:-1])
    model = tc.TimmConvMixer(*_torch_args(arch))
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    assert _convert(tmp_path / "garbage.safetensors", tmp_path / "o", arch) == 2
    assert "cannot read" in _error_line(capsys)
    assert _convert(tmp_path / "nothing.pth", tmp_path / "o", arch) == 2
    assert "is not a file" in _error_line(capsys)

    # Pickled objects other than tensors are refused unless the file is trusted.
    pickled = tmp_path / "objects.pth"
    torch.save({"state_dict": model.state_dict(), "ratio": fractions.Fraction(1, 3)}, pickled)
    assert _convert(pickled, tmp_path / "o1", arch) == 2
    assert "--trust_pickle" in _error_line(capsys)
    assert _convert(pickled, tmp_path / "o1", arch, "--trust_pickle") == 0

    # Writing into a used directory is refused.
    assert _convert(pickled, tmp_path / "o1", arch, "--trust_pickle") == 2
    assert "not empty" in _error_line(capsys)

    # Without PyTorch: pickles give a one-line hint, .safetensors files still convert.
    safetensors.torch.save_file(model.state_dict(), tmp_path / "m.safetensors")
    monkeypatch.setitem(sys.modules, "torch", None)
    assert _convert(pickled, tmp_path / "o2", arch) == 2
    assert "needs PyTorch" in _error_line(capsys)
    assert _convert(tmp_path / "m.safetensors", tmp_path / "o2", arch) == 0
