"""A TFDS builder name that does not exist, in one line with the closest names.

``tfds.data_source`` answers a mistyped name with every registered builder (~250 names, ~380
lines). :func:`unknown_builder_message` turns that error into one line: the name, up to three
close registered names ("did you mean") and how to list them all.
"""

from __future__ import annotations

import difflib


def unknown_builder_message(name: str, error: BaseException, field: str = "data.name") -> str | None:
  """One line for ``error`` if it says that no builder ``name`` is registered, else None."""
  import tensorflow_datasets as tfds  # only where TFDS is already in use
  not_found = getattr(getattr(tfds.core, "registered", None), "DatasetNotFoundError", None)
  if not_found is None or not isinstance(error, not_found):
    return None
  base = str(name).split(":")[0].split("/")[0]  # "coco_captions:1.0.0" / "wmt14/de-en"
  known = tfds.list_builders(with_community_datasets=False)
  close = difflib.get_close_matches(base, known, n=3, cutoff=0.6)
  hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
          else "no registered name is close to it")
  return (f"no TFDS dataset named {name!r} ({field}); {hint} (`python -c \"import "
          f"tensorflow_datasets as tfds; print(tfds.list_builders())\"` lists all "
          f"{len(known)})")
