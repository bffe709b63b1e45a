"""Encoder-pair selection: rank frozen image x text encoder pairs by linear CKA (and mutual k-NN).

    python -m align_jax.cli.select --source=manifest --path=coco_val.jsonl \\
        --image_encoders=facebook/dinov2-large,google/vit-large-patch16-224 \\
        --text_encoders=sentence-transformers/all-roberta-large-v1,bert-large-uncased \\
        --num_images=5000 --out=/tmp/selection [--layers]
    align-jax select ...          # the same, once installed

Writes ``ranking.md``, ``ranking.json``, ``cka_heatmap.png`` and ``best_config_overrides.txt``
(the chosen pair as config flags, for ``python main.py ... --flagfile=OUT/best_config_overrides.txt``)
into ``--out``; what is scored and how: :mod:`align_jax.analysis.select`. This module parses flags
and turns errors into one line.
"""

from __future__ import annotations

import os

from absl import flags

from align_jax.cli import absl_app
from align_jax.parallel import processes as distributed

FLAGS = flags.FLAGS
PROGRAM = "python -m align_jax.cli.select"


def define_flags() -> None:
  flags.DEFINE_enum("source", "manifest",
                    ["manifest", "parquet", "tfds", "webdataset", "synthetic_shapes"],
                    "Where the image-caption pairs come from.")
  flags.DEFINE_string("path", "", "manifest: .jsonl/.csv path; parquet: files, a folder or a "
                      "glob.")
  flags.DEFINE_string("image_root", "", "manifest / parquet: folder of the image paths.")
  flags.DEFINE_string("name", "", "tfds: builder name, e.g. coco_captions.")
  flags.DEFINE_string("split", "", "Split ('' = tfds: validation, synthetic_shapes: heldout).")
  flags.DEFINE_string("data_dir", "", "tfds data_dir.")
  flags.DEFINE_string("urls", "", "webdataset shards.")
  flags.DEFINE_string("caption_key", "", "caption field ('' = the reader's default).")
  flags.DEFINE_list("image_encoders", [], "Image encoders: hub ids or folders.")
  flags.DEFINE_list("text_encoders", [], "Text encoders: hub ids or folders.")
  flags.DEFINE_integer("num_images", 5000, "Pairs to score on (the paper: 5,000 COCO val).")
  flags.DEFINE_integer("batch_size", 64, "Encoding batch size.")
  flags.DEFINE_integer("max_text_length", None, "Tokens per caption (default: 77, or the "
                       "text encoder's limit when smaller).")
  flags.DEFINE_bool("layers", False, "Also score every layer pair.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.mark_flag_as_required("out")
  distributed.define_flags()
  flags.adopt_module_key_flags(distributed)


def main(argv: list[str]) -> None:
  """absl's main: scores the pairs on process 0 (the others wait) and prints the ranking."""
  absl_app.no_arguments(argv)
  from align_jax.analysis import select
  from align_jax.data import reader_factory as readers
  distributed.initialize_or_exit()
  split = FLAGS.split or {"tfds": "validation", "synthetic_shapes": "heldout"}.get(FLAGS.source,
                                                                                  "train")
  data = readers.with_schema({  # the flags over the schema's data block
      "source": FLAGS.source, "path": FLAGS.path, "name": FLAGS.name, "split": split,
      "data_dir": FLAGS.data_dir, "urls": FLAGS.urls, "image_root": FLAGS.image_root,
      "caption_key": FLAGS.caption_key, "num_pairs": FLAGS.num_images})
  try:
    rows = distributed.on_first_process(  # one process writes --out; the others wait for it
        select.select_encoders, data, FLAGS.image_encoders, FLAGS.text_encoders, FLAGS.out,
        num_images=FLAGS.num_images, layers=FLAGS.layers, batch_size=FLAGS.batch_size,
        max_text_length=FLAGS.max_text_length)
  except (ValueError, OSError) as error:  # bad input: one line, no traceback
    raise SystemExit(f"error: {error}") from None
  if rows is None:
    return
  with open(os.path.join(FLAGS.out, "ranking.md")) as f:
    print(f.read())
  print(f"best pair: {rows[0]['image_encoder']} + {rows[0]['text_encoder']} "
        f"(linear CKA {rows[0]['linear_cka']:.4f}); files in {FLAGS.out}")
  print(f"config overrides ({'pair and layers' if FLAGS.layers else 'pair'}): "
        f"--flagfile={os.path.join(FLAGS.out, select.OVERRIDES_FILE)}")


def run(argv: list[str] | None = None) -> None:
  """Entry point (``align-jax select``): :func:`main` on ``argv`` (default: ``sys.argv[1:]``)."""
  absl_app.run_absl(main, __name__, program=PROGRAM, define_flags=define_flags, argv=argv,
                    log_messages=True)


if __name__ == "__main__":
  run()
