"""Times the same ConvMixer in PyTorch and in JAX, in turns in one process.

    python benchmarks/compare_pytorch.py --config configs/cifar10.py --batch_size 128 \
        --image_size 32 [--model NAME] [--dtype float32|bfloat16]
        [--depthwise_impl auto|xla|shift|native] [--pointwise_impl auto|xla|native]
        [--remat none|block|dots] [--width W] [--depth D] [--kernel_size K] [--patch_size P]
        [--scan|--no-scan] [--steps N] [--repeats R] [--threads T] [--compile]
        [--torch_device auto|cpu|cuda] [--peak_tflops P]

Both sides run a full training step (forward, cross-entropy with the config's label smoothing,
backward, gradient clipping if the config clips, AdamW with the config's hyper-parameters) and an
inference forward (eval-mode BatchNorm, no gradients) on the same random batch, same size, same
dtype (PyTorch's bfloat16 is autocast: AMP). PyTorch runs eagerly in NCHW and in channels_last, and
with `--compile` also under `torch.compile` (skipped with the reason where it fails). JAX runs
through `convmixer_jax.benchmark.prepare_model`. PyTorch runs on the GPU where JAX does (one GPU
each: set CUDA_VISIBLE_DEVICES on a host with several; cuDNN autotuned, as timm trains), else on the
CPU with its intra-op threads set to the cores this process may use (XLA's CPU client sizes its pool
the same way); PyTorch and JAX never run at the same time. On a GPU, JAX does not preallocate its
memory (the two frameworks share the card), and each side reports its peak memory: XLA's memory
analysis of the compiled train step for JAX, the caching allocator's peak over one train step and
one inference for each PyTorch contender. Timings exclude warm-up and compilation and are the median
of `--repeats` rounds; each round times `--steps` steps of every contender in turn (PyTorch's
layouts, then JAX; train, then inference), so a slow spell of the machine falls on all of them.
Like the package's commands it runs under `convmixer_jax.runtime.hostmem`'s malloc settings (both
frameworks allocate through glibc; CONVMIXER_MALLOC=default runs it without them). Prints a
table, then as its last line one JSON object with both sides' images/s and the ratios JAX /
PyTorch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys

import jax
import ml_collections
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from torch_convmixer import TimmConvMixer  # noqa: E402

from convmixer_jax.benchmark import (  # noqa: E402
    interleaved_seconds,
    model_figures,
    prepare_model,
    train_tflops_per_sec,
)
from convmixer_jax.model import registry  # noqa: E402
from convmixer_jax.model.convmixer import ConvMixer  # noqa: E402
from convmixer_jax.runtime import hostmem  # noqa: E402
from convmixer_jax.weights import convert  # noqa: E402

LAYOUTS = ("nchw", "channels_last")
DEVICES = ("auto", "cpu", "cuda")
KINDS = ("train", "infer")
_JAX_KEYS = (
    "train_images_per_sec",
    "infer_images_per_sec",
    "train_tflops_per_sec",
    "mfu",
    "peak_memory_bytes",
    "compile_seconds",
    "device_kind",
    "device_count",
)


# ---------------------------------------------------------------------------------------------
# The PyTorch model: the test suite's independent ConvMixer with timm's module names (so
# `convert`'s names map onto it)


def torch_from_jax(
    jax_model: ConvMixer, *, width, depth, kernel_size, patch_size, num_classes, activation
) -> TimmConvMixer:
    """A PyTorch ConvMixer of this architecture holding `jax_model`'s weights and statistics."""
    model = TimmConvMixer(width, depth, kernel_size, patch_size, num_classes, activation)
    state = {
        key: torch.from_numpy(convert.to_torch_layout(np.array(variable.get_value())))
        for key, variable in convert.variables(jax_model).items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return model


def torch_model(config: ml_collections.ConfigDict) -> TimmConvMixer:
    """The config's architecture in PyTorch, with the JAX model's initial weights."""
    arch = registry.config_architecture(config.model)
    return torch_from_jax(registry.from_config(config, arch["num_classes"], config.seed), **arch)


# ---------------------------------------------------------------------------------------------
# PyTorch timings


def _optimizer(model: nn.Module, config: ml_collections.ConfigDict) -> torch.optim.AdamW:
    """AdamW as `convmixer_jax.optim`: decay on >= 2-D parameters unless weight_decay_all."""
    params = list(model.parameters())
    decay = [p for p in params if config.weight_decay_all or p.ndim >= 2]
    rest = [p for p in params if not (config.weight_decay_all or p.ndim >= 2)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.adam_b1, config.adam_b2),
        eps=config.adam_eps,
    )  # fmt: skip


class _CudaWork:
    """A step's result on the GPU: `jax.block_until_ready` (which the timing calls on the last
    result of each run) waits for the queued GPU work through its `block_until_ready`."""

    def __init__(self, value):
        self.value = value

    def block_until_ready(self):
        torch.cuda.synchronize()
        return self


def torch_device(name: str) -> str:
    """`--torch_device`: 'auto' is the GPU where JAX runs on one, else the CPU."""
    if name == "auto":
        name = "cuda" if jax.default_backend() == "gpu" else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "PyTorch sees no CUDA GPU here: install a CUDA build of torch, or pass "
                "--torch_device cpu"
            )
        if jax.default_backend() == "gpu" and jax.device_count() != 1:
            raise SystemExit(
                f"JAX sees {jax.device_count()} GPUs and PyTorch uses one: make one visible "
                "(CUDA_VISIBLE_DEVICES=0) so both run on the same card"
            )
    return name


def prepare_torch(
    config: ml_collections.ConfigDict,
    *,
    layout: str,
    compile: bool,
    device: str = "cpu",
) -> dict:
    """A PyTorch train step and inference forward in `layout` ('nchw' or 'channels_last') on
    `device`, eager or under torch.compile, each run once (warm-up; compilation for
    torch.compile), as `train_once` and `infer_once`, with `peak_memory_bytes` on a GPU (what
    this contender added to the allocator's peak: model, optimizer state, activations)."""
    cuda = device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as timm's training script: autotuned convs
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    model = torch_model(config)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    rng = np.random.default_rng(0)
    size, batch_size = config.image_size, config.batch_size
    images = torch.from_numpy(rng.normal(size=(batch_size, 3, size, size)).astype(np.float32))
    images = images.to(device).contiguous(memory_format=fmt)
    labels = torch.from_numpy(rng.integers(0, model.head.out_features, batch_size)).to(device)
    opt = _optimizer(model, config)
    autocast = torch.autocast(device, torch.bfloat16, enabled=config.dtype == "bfloat16")
    done = _CudaWork if cuda else lambda value: value
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    run = torch.compile(model) if compile else model

    def train_once():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = run(images)
        loss = loss_fn(logits.float(), labels)
        loss.backward()
        if config.grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        opt.step()
        return done(loss)

    def infer_once():
        model.eval()
        with torch.inference_mode(), autocast:
            return done(run(images))

    jax.block_until_ready((train_once(), infer_once()))
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return {"train_once": train_once, "infer_once": infer_once, "peak_memory_bytes": peak}


# ---------------------------------------------------------------------------------------------
# The comparison


def load_config(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, as `--config` loads it."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def compare(
    config: ml_collections.ConfigDict,
    *,
    steps: int,
    repeats: int,
    layouts: tuple[str, ...] = LAYOUTS,
    compile: bool = False,
    device: str = "cpu",
    peak_tflops: float = 0.0,
) -> dict:
    """PyTorch on `device` (each layout, eager then compiled if asked) and JAX, timed in turns;
    figures and ratios."""
    contenders: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for mode in ("eager", "compile") if compile else ("eager",):
        for layout in layouts:
            name = f"{mode}_{layout}"
            try:
                contenders[name] = prepare_torch(
                    config, layout=layout, compile=mode == "compile", device=device
                )
            except Exception as e:  # noqa: BLE001  (torch.compile's failures have many types)
                if mode == "eager":
                    raise
                skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if device == "cuda":
        torch.cuda.empty_cache()  # PyTorch's cached blocks back to the card for XLA's compiler
    contenders["jax"] = jax_run = prepare_model(config)
    fns = {(name, kind): run[f"{kind}_once"] for name, run in contenders.items() for kind in KINDS}
    seconds = interleaved_seconds(fns, steps, repeats)
    jax_result = model_figures(
        config, jax_run, seconds["jax", "train"], seconds["jax", "infer"], peak_tflops
    )
    flops, peak = jax_result["model_flops_per_image"], jax_result["peak_tflops"]
    same_kind = (device == "cuda") == (jax.default_backend() == "gpu")
    torch_results = {}
    for name, run in contenders.items():
        if name == "jax":
            continue
        figures = {
            f"{kind}_images_per_sec": config.batch_size / seconds[name, kind] for kind in KINDS
        }
        tflops = train_tflops_per_sec(flops, figures["train_images_per_sec"])  # one device
        torch_results[name] = {
            **figures,
            "train_tflops_per_sec": tflops,
            "mfu": tflops / peak if peak and same_kind else None,
            "peak_memory_bytes": run["peak_memory_bytes"],
        }
    ratios = {}
    for kind in KINDS:
        key = f"{kind}_images_per_sec"
        ours = jax_result[key]
        eager = {n: r[key] for n, r in torch_results.items() if n.startswith("eager_")}
        ratios[f"{kind}_vs_fastest_eager"] = ours / max(eager.values())
        ratios[f"{kind}_vs"] = {n: ours / r[key] for n, r in torch_results.items()}
    return {
        "model": config.model.name,
        **registry.config_architecture(config.model),
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "dtype": config.dtype,
        "depthwise_impl": jax_result["depthwise_impl"],
        "pointwise_impl": jax_result["pointwise_impl"],
        "remat": config.model.remat,
        "scan": config.model.scan,
        "torch_device": device,
        "torch_version": torch.__version__,
        "jax_version": jax.__version__,
        "torch_threads": torch.get_num_threads(),
        "jax": {k: jax_result[k] for k in _JAX_KEYS},
        "pytorch": torch_results,
        "pytorch_skipped": skipped,
        "ratios": ratios,
    }


def _table(result: dict) -> str:
    rows = [("jax", result["jax"])] + [(f"pytorch {n}", r) for n, r in result["pytorch"].items()]
    lines = [f"{'':<28}{'train img/s':>14}{'infer img/s':>14}{'JAX/this train':>16}"
             f"{'JAX/this infer':>16}{'train MFU':>11}{'peak GiB':>10}"]  # fmt: skip
    jt, ji = result["jax"]["train_images_per_sec"], result["jax"]["infer_images_per_sec"]
    for name, r in rows:
        t, i = r["train_images_per_sec"], r["infer_images_per_sec"]
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        peak = r["peak_memory_bytes"]
        peak = "-" if peak is None else f"{peak / 2**30:.2f}"
        lines.append(
            f"{name:<28}{t:>14.2f}{i:>14.2f}{jt / t:>15.2f}x{ji / i:>15.2f}x{mfu:>11}{peak:>10}"
        )
    lines += [f"pytorch {n}: skipped ({why})" for n, why in result["pytorch_skipped"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config file in configs/")
    parser.add_argument("--model", default="", help="registered model name ('': the config's)")
    for key in ("width", "depth", "kernel_size", "patch_size"):
        parser.add_argument(f"--{key}", type=int, default=0, help="0: the model's")
    parser.add_argument("--batch_size", type=int, default=0, help="0: the config's")
    parser.add_argument("--image_size", type=int, default=0, help="0: the config's")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--depthwise_impl", default="", help="auto, xla, shift or native ('': config's)"
    )
    parser.add_argument("--pointwise_impl", default="", help="auto, xla or native ('': config's)")
    parser.add_argument(
        "--remat", default="none", help="JAX model.remat (default none: PyTorch eager keeps "
        "every activation, so this compares the same work; '': the config's)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds; the median is kept")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: all cores)")
    parser.add_argument(
        "--scan", action=argparse.BooleanOptionalAction, default=None,
        help="JAX model.scan (default: the config's)",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument(
        "--torch_device", default="auto", choices=DEVICES,
        help="where PyTorch runs (auto: the GPU where JAX runs on one, else the CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--peak_tflops", type=float, default=0.0,
        help="peak dense TFLOP/s of one device for the MFU (0: the benchmark's known table)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    # Both frameworks allocate on the same GPU: JAX must not take most of it up front. Read
    # when JAX creates its GPU client, below.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    config = load_config(args.config)
    config.dtype = args.dtype
    config.bn_group_size = 0  # PyTorch's BatchNorm normalises over the whole batch
    config.mixup_alpha = config.cutmix_alpha = 0.0  # and its step does not mix
    for key in ("batch_size", "image_size"):
        if getattr(args, key):
            config[key] = getattr(args, key)
    if args.model:
        config.model.name = args.model
    for key in ("width", "depth", "kernel_size", "patch_size"):
        if getattr(args, key):
            config.model[key] = getattr(args, key)
    if args.depthwise_impl:
        config.model.depthwise_impl = args.depthwise_impl
    if args.pointwise_impl:
        config.model.pointwise_impl = args.pointwise_impl
    if args.remat:
        config.model.remat = args.remat
    if args.scan is not None:
        config.model.scan = args.scan
    device = torch_device(args.torch_device)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))

    load_before = os.getloadavg()
    result = compare(
        config, steps=args.steps, repeats=args.repeats, compile=args.compile, device=device,
        peak_tflops=args.peak_tflops,
    )  # fmt: skip
    result["malloc"] = hostmem.mode()
    result["load_average_before"] = [round(x, 2) for x in load_before]
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(
        f"{result['model']} (h{result['width']} d{result['depth']} k{result['kernel_size']} "
        f"p{result['patch_size']}), {result['image_size']} px, batch {result['batch_size']}, "
        f"{result['dtype']}, JAX depthwise {result['depthwise_impl']}, "
        f"pointwise {result['pointwise_impl']}, remat {result['remat']}, "
        f"scan {result['scan']}, malloc {result['malloc']}, torch on {result['torch_device']}, "
        f"torch threads {result['torch_threads']}, load {result['load_average_before']} -> "
        f"{result['load_average_after']}"
    )
    print(_table(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    hostmem.reexec_tuned()
    main()
