"""Top-5 ImageNet classes of image files, from a converted or trained checkpoint.

    python -m convmixer_jax.predict --model convmixer_1536_20 --checkpoint DIR IMAGE...

Each JPEG/PNG file gets the variant's own eval preprocessing (shorter side resized to
floor(image_size / crop_pct) with its interpolation, center crop, mean/std), images run through the
model in batches on JAX's default device, and the five most probable classes are printed with
their probabilities. Class names are ImageNet-1k's for 1000-class models, else class indices.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from flax import nnx

from convmixer_jax.data.input_pipeline import eval_preprocess
from convmixer_jax.model import inference, registry
from convmixer_jax.model.convmixer import ConvMixer
from convmixer_jax.runtime import hostmem
from convmixer_jax.train import checkpointing
from convmixer_jax.weights.convert import add_model_arguments, model_arguments

TOP_K = 5


class PredictError(RuntimeError):
    """An image that cannot be read or decoded; the message names the file."""


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in label order, read from tensorflow_datasets.

    TFDS ships the readable names (tench, goldfish, ...) with its SI-Score dataset; a TFDS
    version without that list falls back to the WordNet ids of its imagenet2012 labels.
    """
    try:
        from tensorflow_datasets.datasets.siscore.labels import IMAGENET_LABELS_LIST

        return list(IMAGENET_LABELS_LIST)
    except ImportError:
        labels = importlib.resources.files("tensorflow_datasets.datasets.imagenet2012")
        return (labels / "labels.txt").read_text().split()


def class_names(num_classes: int) -> list[str]:
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class {i}" for i in range(num_classes)]


def preprocess_config(name: str, image_size: int = 0) -> ml_collections.ConfigDict:
    """The eval-preprocessing settings of variant `name` (input_pipeline.eval_preprocess's)."""
    spec = registry.get_spec(name)
    return ml_collections.ConfigDict(
        {
            "image_size": image_size or spec.image_size,
            "crop_pct": spec.crop_pct,
            "eval_interpolation": spec.interpolation,
            "mean": spec.mean,
            "std": spec.std,
        }
    )


def load_images(paths: Sequence[str], config: ml_collections.ConfigDict) -> np.ndarray:
    """Preprocessed float32 NHWC images of `paths`; a PredictError names a bad file."""
    images = []
    for path in paths:
        try:
            images.append(eval_preprocess(tf.io.read_file(path), config).numpy())
        except (tf.errors.OpError, ValueError) as e:
            reason = e.message if isinstance(e, tf.errors.OpError) else str(e)
            raise PredictError(f"cannot read image {path}: {reason.splitlines()[0]}") from None
    return np.stack(images)


def probabilities(model: ConvMixer, batch_size: int):
    """A function: images -> class probabilities, jitted at one padded batch shape."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        logits = inference.reparameterize(nnx.merge(graphdef, state))(images)
        return jax.nn.softmax(logits, axis=-1)

    def run(images: np.ndarray) -> np.ndarray:
        padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
        padded[: len(images)] = images
        return np.asarray(forward(state, jnp.asarray(padded)))[: len(images)]

    return run


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict(
    model: ConvMixer,
    paths: Sequence[str],
    config: ml_collections.ConfigDict,
    batch_size: int = 32,
) -> Iterator[tuple[str, np.ndarray]]:
    """(path, class probabilities) per image, computed `batch_size` images at a time."""
    run = probabilities(model, batch_size)
    for chunk in _batches(paths, batch_size):
        yield from zip(chunk, run(load_images(chunk, config)), strict=True)


def format_top(path: str, probs: np.ndarray, names: Sequence[str], k: int = TOP_K) -> str:
    """The file name, then one '  probability  class' line per top-k class."""
    top = np.argsort(-probs, kind="stable")[:k]
    return "\n".join([path, *(f"  {probs[i]:.4f}  {names[i]}" for i in top)])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convmixer_jax.predict", description=__doc__.split("\n\n")[0]
    )
    add_model_arguments(parser, required=True)
    parser.add_argument("--checkpoint", required=True, help="converted or trained checkpoint")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=0, help="0: the variant's")
    parser.add_argument("images", nargs="+", help="JPEG or PNG files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tf.config.set_visible_devices([], "GPU")  # TensorFlow only decodes images here.
    try:
        kwargs = model_arguments(args)
        model = registry.create_model(args.model, checkpoint=args.checkpoint, **kwargs)
        names = class_names(model.head.out_features)
        config = preprocess_config(args.model, args.image_size)
        for path, probs in predict(model, args.images, config, args.batch_size):
            print(format_top(path, probs, names), flush=True)
    except (PredictError, checkpointing.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    hostmem.reexec_tuned()
    sys.exit(main())
