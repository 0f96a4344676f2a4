"""Prepares a TFDS dataset, e.g. ImageNet from its manually downloaded files.

    python -m convmixer_jax.data.prepare imagenet2012 --manual_dir M --data_dir D
    python -m convmixer_jax.data.prepare imagenet2012_real --manual_dir M --data_dir D
    python -m convmixer_jax.data.prepare imagenet_v2/matched-frequency --data_dir D

M holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org; ReaL needs only
the latter, and downloads its labels); D receives the prepared TFDS dataset (local or gs://).
Datasets without manual files (ImageNet-V2) are downloaded. This runs TFDS's own builder;
`tfds build` would do the same but needs apache_beam installed.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("manual_dir", None, "Directory with the manually downloaded files.")
flags.DEFINE_string("data_dir", None, "TFDS data directory to prepare into.")
flags.mark_flags_as_required(["data_dir"])

# Files each dataset needs in manual_dir.
MANUAL_FILES = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_real": ("ILSVRC2012_img_val.tar",),
}


def prepare(name: str, manual_dir: str | None, data_dir: str):
    """Builds `name` from the files in `manual_dir` into `data_dir`; returns the builder."""
    import tensorflow_datasets as tfds

    needed = MANUAL_FILES.get(name.split(":")[0], ())
    if needed and not manual_dir:
        raise FileNotFoundError(f"{name} needs {', '.join(needed)}: pass --manual_dir")
    missing = [f for f in needed if not os.path.exists(f"{manual_dir}/{f}")]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not found in {manual_dir!r}; download them from image-net.org "
            "into that directory"
        )
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: python -m convmixer_jax.data.prepare NAME [--manual_dir M] "
                             "--data_dir D")  # fmt: skip
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    try:
        builder = prepare(argv[1], FLAGS.manual_dir, FLAGS.data_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    print(f"prepared {argv[1]} in {builder.data_dir}: {splits}")


if __name__ == "__main__":
    app.run(main)
