"""Config files by name: ``--config=demo`` is the packaged ``configs/demo.py``.

An installed align_jax ships the clone's ``configs/`` as the package ``align_jax.configs``
(pyproject.toml), so ``align-jax train --config=demo_online --workdir=...`` works from any folder;
``--config=dinov2_roberta:batch=32768`` picks a variant as with a path. A path to an existing file
always wins, so ``--config=configs/demo.py`` from a clone, or ``--config=my_config.py``, mean what
they always meant.
"""

from __future__ import annotations

import importlib.util
import os

import align_jax


def packaged_dir() -> str | None:
  """The folder of the packaged configs: ``align_jax.configs`` once installed, else the clone's
  ``configs/`` beside the ``align_jax`` package; None when neither exists."""
  spec = importlib.util.find_spec("align_jax.configs")
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  clone = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(align_jax.__file__))),
                       "configs")
  return clone if os.path.isfile(os.path.join(clone, "__init__.py")) else None


def packaged_names() -> list[str]:
  """The packaged configs' names (``demo``, ``demo_online``, ...), sorted."""
  folder = packaged_dir()
  if folder is None:
    return []
  return sorted(name[:-3] for name in os.listdir(folder)
                if name.endswith(".py") and not name.startswith("_"))


def resolve(value: str) -> str:
  """``--config``'s value with a packaged config's name replaced by its file's path.

  ``value`` is ``FILE[:variant]``. An existing file is kept; a name (with or without ``.py``) of a
  packaged config becomes its path (also as ``configs/NAME.py``, the clone's path, given in
  another folder); anything else raises ValueError listing the packaged names.
  """
  file, sep, variant = value.partition(":")
  if os.path.exists(file):
    return value
  name = file.removesuffix(".py").removeprefix("configs/")  # "configs/demo.py" run elsewhere
  names = packaged_names()
  if name in names:
    return os.path.join(packaged_dir(), name + ".py") + sep + variant
  raise ValueError(f"no config file {file!r}; give a path to a config .py file, or a packaged "
                   f"config by name: {', '.join(names) or '(none found)'} (e.g. --config="
                   f"{names[0] if names else 'demo'}, or --config=NAME:variant)")
