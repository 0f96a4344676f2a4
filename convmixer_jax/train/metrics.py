"""Metric writers: TensorBoard and the console through CLU, plus an append-only metrics.jsonl.

CLU has no JSON-lines writer, so `JsonlWriter` implements its `MetricWriter` interface: one JSON
object per call, `{"step": N, "<name>": value, ...}`, appended and never rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
from clu import metric_writers
from etils import epath


class JsonlWriter(metric_writers.MetricWriter):
    """Appends scalars to `path` as JSON lines; other summary kinds are ignored."""

    def __init__(self, path: str):
        self._path = epath.Path(path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n"
        if "://" in str(self._path):  # object stores cannot append: write the grown file anew
            old = self._path.read_text() if self._path.exists() else ""
            self._path.write_text(old + row)
        else:
            with open(self._path, "a") as f:
                f.write(row)

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """Process 0 writes TensorBoard events and metrics.jsonl; other processes only log."""
    if jax.process_index() > 0:
        return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
    return metric_writers.MultiWriter(
        [
            metric_writers.create_default_writer(workdir, asynchronous=False),
            JsonlWriter(str(epath.Path(workdir) / "metrics.jsonl")),
        ]
    )


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The rows of DIR/metrics.jsonl, in order."""
    text = (epath.Path(workdir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
