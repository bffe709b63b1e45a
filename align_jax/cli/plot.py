"""Draw a run's curves (loss, temperature, every eval metric against the step) into a PNG.

    python -m align_jax.cli.plot WORKDIR [--out=curves.png]
    align-jax plot WORKDIR          # the same, once installed

Reads ``WORKDIR/metrics.jsonl`` (local or ``gs://``) and writes ``WORKDIR/curves.png`` unless
``--out`` names another file (:func:`align_jax.analysis.plotting.plot_run`). This module parses
flags and turns errors into one line.
"""

from __future__ import annotations

import sys

from absl import flags

from align_jax.cli import absl_app

FLAGS = flags.FLAGS
PROGRAM = "python -m align_jax.cli.plot"


def define_flags() -> None:
  flags.DEFINE_string("out", None, "PNG to write (default WORKDIR/curves.png).")


def main(argv: list[str]) -> None:
  """absl's main: ``argv[1]`` is the run's folder."""
  if len(argv) != 2:
    given = f"got {argv[1:]}" if len(argv) > 2 else "none given"
    raise SystemExit(f"error: give one WORKDIR, the run's folder ({given}); see --help")
  from align_jax.analysis import plotting
  try:
    path = plotting.plot_run(argv[1], FLAGS.out)
  except (ValueError, OSError) as error:
    sys.exit(f"error: {error}")
  print(f"wrote {path}")


def run(argv: list[str] | None = None) -> None:
  """Entry point (``align-jax plot``): :func:`main` on ``argv`` (default: ``sys.argv[1:]``)."""
  absl_app.run_absl(main, __name__, program=PROGRAM, define_flags=define_flags, argv=argv,
                    arguments="WORKDIR [flags]")


if __name__ == "__main__":
  run()
