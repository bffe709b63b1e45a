"""Export a training run's projectors as a folder ``align_jax.AlignedModel.load(OUT)`` reads.

    python -m align_jax.cli.export --workdir=/tmp/align_demo_online --out=/tmp/my_model [--step=N]
    align-jax export --workdir=... --out=...     # the same, once installed

Writes ``projectors.safetensors``, ``config.json`` and ``align_jax_model.json`` (what each holds:
:mod:`align_jax.serving.export`). ``--step`` picks a checkpoint (default: the latest that
restores). With ``--distributed`` (and the other multi-process flags) every process restores and
process 0 writes. This module parses flags and turns errors into one line.
"""

from __future__ import annotations

import sys

from absl import flags

from align_jax.cli import absl_app
from align_jax.parallel import processes as distributed

FLAGS = flags.FLAGS
PROGRAM = "python -m align_jax.cli.export"


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The training workdir (checkpoints/ and config.json).")
  flags.DEFINE_string("out", None, "The folder to write.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest that restores).")
  flags.mark_flags_as_required(["workdir", "out"])
  distributed.define_flags()
  flags.adopt_module_key_flags(distributed)


def main(argv: list[str]) -> None:
  """absl's main: the parsed flags' export, one line of errors."""
  absl_app.no_arguments(argv)
  distributed.initialize_or_exit()
  import jax
  from align_jax.serving import export
  try:
    card = export.export(FLAGS.workdir, FLAGS.out, step=FLAGS.step)
  except (ValueError, OSError) as error:
    sys.exit(f"error: {error}")
  if jax.process_index() == 0:
    print(f"exported step {card['step']} ({card['num_params']:,} params) to {FLAGS.out}")


def run(argv: list[str] | None = None) -> None:
  """Entry point (``align-jax export``): :func:`main` on ``argv`` (default: ``sys.argv[1:]``);
  ends with SystemExit, status 0 on success."""
  absl_app.run_absl(main, __name__, program=PROGRAM, define_flags=define_flags, argv=argv)


if __name__ == "__main__":
  run()
