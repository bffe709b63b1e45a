"""Train projectors that align two frozen encoders: ``python main.py --config=... --workdir=...``.

The flags, modes and examples are in :mod:`align_jax.cli.train`'s docstring (``--helpfull`` lists
them); once the package is installed, ``align-jax train ...`` is the same command.
"""

from align_jax.cli import train as train_cli

if __name__ == "__main__":
  train_cli.run()
