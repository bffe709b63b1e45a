"""``align-jax``: one console command, with a subcommand per entry point of the package.

    align-jax train --config=configs/demo.py --workdir=/tmp/align_demo   # = python main.py ...
    align-jax evaluate --config=... --workdir=RUN                         # = main.py --mode=evaluate
    align-jax extract_features --config=... --workdir=FEATS
    align-jax export --workdir=RUN --out=MODEL
    align-jax select ... | curate ... | eval_suite ... | aot ...
    align-jax plot RUN                                                    # RUN/curves.png

Each subcommand runs its module's command line in :mod:`align_jax.cli` (``python -m
align_jax.cli.export`` and so on) with the remaining arguments, so flags, help and errors are the
module's. Installed by ``pip install`` as the ``align-jax`` script (pyproject.toml); ``python -m
align_jax.cli.main`` is the same.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# subcommand -> (module, extra leading arguments, what it does)
COMMANDS = {
    "train": ("align_jax.cli.train", (), "train (or resume) projectors in --workdir"),
    "evaluate": ("align_jax.cli.train", ("--mode=evaluate",),
                 "run config.evals on a run's latest (or --step) checkpoint"),
    "extract_features": ("align_jax.cli.train", ("--mode=extract_features",),
                         "run the frozen encoders over config.data once into a feature store"),
    "export": ("align_jax.cli.export", (), "write a trained run as a folder AlignedModel.load reads"),
    "eval_suite": ("align_jax.cli.eval_suite", (), "zero-shot and retrieval benchmark suite"),
    "select": ("align_jax.cli.select", (), "rank encoder pairs by CKA / mutual k-NN"),
    "curate": ("align_jax.cli.curate", (), "concept-balanced selection from a pool"),
    "aot": ("align_jax.cli.aot", (), "compile the train step ahead of time for a TPU/CPU topology"),
    "plot": ("align_jax.cli.plot", (), "draw a run's curves from metrics.jsonl into a PNG"),
}


def usage() -> str:
  lines = ["usage: align-jax COMMAND [flags]   (align-jax COMMAND --help for its flags)", "",
           "commands:"]
  lines += [f"  {name:<17} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs ``COMMAND`` with the rest of ``argv`` as that module's ``sys.argv``."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in COMMANDS:
    sys.exit(f"error: unknown command {name!r}; one of: {', '.join(COMMANDS)}")
  module, extra, _ = COMMANDS[name]
  sys.argv = [f"align-jax {name}", *extra, *argv[2:]]
  importlib.import_module(module).run()


if __name__ == "__main__":
  main()
