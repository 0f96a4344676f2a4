"""Entry point: python -m convmixer_jax.main --config configs/X.py --workdir DIR [--mode eval]."""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from convmixer_jax.runtime import hostmem

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming if possible) or evaluate.")
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for runs spanning several processes."
)
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool(
    "multihost",
    None,
    "Initialise jax.distributed from the cluster environment (Cloud TPU pod slices, SLURM, "
    "Open MPI). Default: on when SLURM or Open MPI report several tasks.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _cluster_has_several_tasks() -> bool:
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1")) > 1:
            return True
    return False


def init_distributed() -> None:
    """Starts JAX's multi-controller runtime when this run spans several processes."""
    import jax

    if FLAGS.coordinator_address:
        jax.distributed.initialize(
            FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )  # fmt: skip
    elif FLAGS.multihost or (FLAGS.multihost is None and _cluster_has_several_tasks()):
        jax.distributed.initialize()  # JAX reads the cluster's own environment.


class _OwnInfoOnly(pylogging.Filter):
    """Keeps our INFO lines (progress, eval) and every library's warnings and errors."""

    _package = os.path.dirname(os.path.abspath(__file__))

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or record.pathname.startswith(self._package)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Keep TensorFlow (used only for input pipelines) off the accelerators.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")

    from convmixer_jax.data import datasets
    from convmixer_jax.train import checkpointing, loop, preemption
    from convmixer_jax.train import config as config_lib

    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    init_distributed()
    run = loop.evaluate if FLAGS.mode == "eval" else loop.train_and_evaluate
    try:
        run(FLAGS.config, FLAGS.workdir)
    except (config_lib.ConfigError, datasets.DataError, checkpointing.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except loop.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except preemption.Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(preemption.EXIT_PREEMPTED)


if __name__ == "__main__":
    hostmem.reexec_tuned()
    app.run(main)
