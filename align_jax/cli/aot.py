"""Ahead-of-time compile check: compile the real train step for a TPU/CPU topology, without it.

    python -m align_jax.cli.aot --config=configs/demo.py --topology=cpu:8
    python -m align_jax.cli.aot --config=configs/demo.py --topology=v5e-256 --config.batch_size=8192
    python -m align_jax.cli.aot --config=configs/dinov2_roberta.py:batch=65536 --topology=2xv5e-256
    align-jax aot ...          # the same, once installed

Prints XLA's per-device memory and FLOPs for the step; a config that does not fit the mesh or the
chip's memory stops with one line. Topologies and what is compiled: :mod:`align_jax.train.aot`.
This module parses flags and turns errors into one line.
"""

from __future__ import annotations

import sys
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from align_jax.cli import absl_app

FLAGS = flags.FLAGS
PROGRAM = "python -m align_jax.cli.aot"


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).",
                                  lock_config=True)
  flags.DEFINE_string("topology", "cpu:8", "cpu:N, or a Cloud TPU type such as v4-32 or v5e-256 "
                      "(SxTYPE, e.g. 2xv5e-256: S slices).")
  flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined by DCN (same as SxTYPE).")
  flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad --config.KEY or variant as one "error:" line (as main.py)."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as error:
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip(" '\"") for line in text.splitlines() if line.strip()]
    sys.exit(f"error: {lines[-1] if 'Traceback' in text else ' '.join(lines)}")


def main(argv: Sequence[str]) -> None:
  """absl's main: compiles the step for --topology and prints XLA's report."""
  absl_app.no_arguments(argv)
  from align_jax.train import aot
  try:
    topology = aot.with_slices(FLAGS.topology, FLAGS.num_slices)
  except ValueError as error:
    sys.exit(f"error: {error}")
  aot.prepare_process(topology)  # compile-only: never starts an accelerator backend
  config = FLAGS.config
  if not isinstance(config, ml_collections.ConfigDict):
    try:
      config.lock()  # config_flags' placeholder for a file that failed to load raises its error
    except Exception as error:  # pylint: disable=broad-except
      lines = [line.strip() for line in str(error).splitlines() if line.strip()]
      sys.exit(f"error: could not load --config: {' '.join(lines[-2:])}")
  try:
    report = aot.compile_train_step(config, topology, check_memory=False)
    print(report.summary())
    report.check_fits()
  except (ValueError, OSError, aot.TopologyUnavailableError) as error:
    sys.exit(f"error: {error}")


def run(argv: list[str] | None = None) -> None:
  """Entry point (``align-jax aot``): :func:`main` on ``argv`` (default: ``sys.argv[1:]``)."""
  absl_app.run_absl(main, __name__, program=PROGRAM, define_flags=define_flags,
                    flags_parser=parse_flags, argv=argv)


if __name__ == "__main__":
  run()
