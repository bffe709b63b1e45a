"""Curation: a concept-balanced subset of an image-caption pool, written as a training manifest.

    python -m align_jax.cli.curate --pool=pool.jsonl --features=pool_text.npy \\
        --concepts=concepts.txt --text_encoder=sentence-transformers/all-roberta-large-v1 \\
        --top_k=50000 --quota=2000 --out=curated.jsonl
    align-jax curate ...          # the same, once installed

``--prototypes=PROTOS.npy`` replaces ``--text_encoder`` (precomputed ``[C, D]`` prototypes). The
output keeps the selected pool lines unchanged, plus ``concept`` and ``score``; the algorithm:
:mod:`align_jax.analysis.curation_files`. This module parses flags and turns errors into one line.
"""

from __future__ import annotations

from absl import flags

from align_jax.cli import absl_app
from align_jax.parallel import processes as distributed

FLAGS = flags.FLAGS
PROGRAM = "python -m align_jax.cli.curate"


def define_flags() -> None:
  flags.DEFINE_string("pool", None, "Pool manifest (JSONL: image path + caption per line).")
  flags.DEFINE_string("features", None, "[N, D] .npy caption features, row i = pool line i.")
  flags.DEFINE_string("concepts", None, "Concept names, one per line.")
  flags.DEFINE_string("text_encoder", "", "Text encoder (hub id or folder) for prototypes; the "
                      "same one that made --features.")
  flags.DEFINE_string("prototypes", "", "Or: precomputed [C, D] prototypes (.npy).")
  flags.DEFINE_list("templates", ["a photo of a {}."], "Prompt templates for prototypes.")
  flags.DEFINE_integer("max_text_length", None, "Tokens per prompt (default: 77, or the text "
                       "encoder's limit when smaller).")
  flags.DEFINE_integer("top_k", 50000, "Candidates kept per concept (paper: 50,000).")
  flags.DEFINE_integer("quota", 2000, "Most samples per concept (paper: 2,000).")
  flags.DEFINE_integer("chunk_size", 65536, "Captions scored per chunk (bounds memory).")
  flags.DEFINE_string("out", None, "Curated manifest (.jsonl).")
  flags.mark_flags_as_required(["pool", "features", "concepts", "out"])
  distributed.define_flags()
  flags.adopt_module_key_flags(distributed)


def _curate_and_report() -> None:
  from align_jax.analysis import curation_files as curate
  stats = curate.curate_from_files(
      FLAGS.pool, FLAGS.features, FLAGS.concepts, FLAGS.out, text_encoder=FLAGS.text_encoder,
      prototypes=FLAGS.prototypes, templates=FLAGS.templates,
      max_text_length=FLAGS.max_text_length, top_k=FLAGS.top_k, quota=FLAGS.quota,
      chunk_size=FLAGS.chunk_size)
  print(f"scored {stats['n_scored']:,} captions against {stats['num_concepts']:,} concepts; "
        f"selected {stats['n_selected']:,} into {stats['out_path']}")


def main(argv: list[str]) -> None:
  """absl's main: curates on process 0 (the others wait), one line of errors."""
  absl_app.no_arguments(argv)
  distributed.initialize_or_exit()
  try:
    distributed.on_first_process(_curate_and_report)  # one process writes --out
  except (ValueError, OSError) as error:  # bad input: one line, no traceback
    raise SystemExit(f"error: {error}") from None


def run(argv: list[str] | None = None) -> None:
  """Entry point (``align-jax curate``): :func:`main` on ``argv`` (default: ``sys.argv[1:]``)."""
  absl_app.run_absl(main, __name__, program=PROGRAM, define_flags=define_flags, argv=argv,
                    log_messages=True)


if __name__ == "__main__":
  run()
