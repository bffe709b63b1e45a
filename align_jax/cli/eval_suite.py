"""The evaluation suite: zero-shot and retrieval of a training run on freeze-align's benchmarks.

    python -m align_jax.cli.eval_suite --workdir=RUN [--data_dir=TFDS_DIR] [--manifests=DIR]
        [--prompts=DIR] [--step=N] [--only=imagenet,pets] [--templates=simple] [--batch_size=1024]
    align-jax eval_suite --workdir=RUN ...      # the same, once installed

Prints one table with the numbers freeze-align reported beside the run's and writes it to
``RUN/suite_results.md`` / ``.json`` and ``RUN/clip_benchmark/<dataset>.json``; where each
benchmark's data is looked for, and the prompts: :mod:`align_jax.evaluate.suite`. Exits 1 when a
benchmark was found but could not be read. This module parses flags and turns errors into one line.
"""

from __future__ import annotations

import sys

from absl import flags

from align_jax.cli import absl_app
from align_jax.parallel import processes as distributed

FLAGS = flags.FLAGS
PROGRAM = "python -m align_jax.cli.eval_suite"


def define_flags() -> None:
  from align_jax.evaluate import suite
  flags.DEFINE_string("workdir", None, "The training run's folder.")
  flags.DEFINE_string("data_dir", "", "TFDS data_dir with array_record builds (default: "
                      "$TFDS_DATA_DIR or ~/tensorflow_datasets).")
  flags.DEFINE_string("manifests", "", "Folder of <key>.jsonl / <key>.csv manifests (e.g. "
                      "aircraft.jsonl, ucf101.jsonl, flickr30k.jsonl).")
  flags.DEFINE_string("prompts", "", "Folder of <key>.json class descriptions and "
                      "<key>_classes.txt class names.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_list("only", [], "Comma-separated benchmark keys (default: all): "
                    + ", ".join(f"{b.key} ({b.title})" for b in suite.BENCHMARKS) + ".")
  flags.DEFINE_string("templates", "", "One template set for every classification set, e.g. "
                      "simple (default: each dataset's CLIP set).")
  flags.DEFINE_integer("batch_size", 1024, "Global embedding batch.")
  flags.DEFINE_string("model_name", "", "'model' in the clip_benchmark JSON files (default: "
                      "align_jax:<image encoder>+<text encoder>).")
  flags.DEFINE_string("pretrained_name", "", "'pretrained' in the clip_benchmark JSON files "
                      "(default: <run folder>@<step>).")
  flags.mark_flags_as_required(["workdir"])
  distributed.define_flags()
  flags.adopt_module_key_flags(distributed)


def main(argv: list[str]) -> int:
  """absl's main: the suite on the parsed flags; 1 when a benchmark had an error."""
  absl_app.no_arguments(argv)
  from align_jax.evaluate import suite
  distributed.initialize_or_exit()
  only = [key.strip() for key in FLAGS.only if key.strip()]
  try:
    report = suite.run_suite(FLAGS.workdir, data_dir=FLAGS.data_dir, manifests=FLAGS.manifests,
                             prompts=FLAGS.prompts, step=FLAGS.step, only=only,
                             templates=FLAGS.templates, batch_size=FLAGS.batch_size,
                             model_name=FLAGS.model_name, pretrained_name=FLAGS.pretrained_name)
  except (ValueError, OSError) as error:
    sys.exit(f"error: {error}")
  return 1 if report["errors"] else 0


def run(argv: list[str] | None = None) -> None:
  """Entry point (``align-jax eval_suite``): :func:`main` on ``argv`` (default:
  ``sys.argv[1:]``); ends with SystemExit."""
  absl_app.run_absl(main, __name__, program=PROGRAM, define_flags=define_flags, argv=argv,
                    log_messages=True, log_format="%(asctime)s %(message)s")


if __name__ == "__main__":
  run()
