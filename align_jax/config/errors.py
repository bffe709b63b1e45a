"""Config mistakes as one line: the key the user meant ("did you mean"), and where a config file
sets or reads a key (``file:line``, found in the file's source).

    unknown config key 'optim.lr' in my_config.py:12; did you mean 'optim.learning_rate'?

The line comes from the config file's syntax tree (:mod:`ast`), not from the stack frames of the
error, so it is found the same way whether the key was set in the file or the file was loaded
without raising (:func:`align_jax.config.schema.built_unlocked`).
"""

from __future__ import annotations

import ast
import difflib

import ml_collections

from align_jax.config import schema


def _initials(name: str) -> str:
  return "".join(word[0] for word in name.split("_") if word)


def _close_match(word: str, candidates: list[str]) -> str | None:
  """A misspelling (difflib) or initials (``lr`` -> ``learning_rate``) of one candidate."""
  if len(word) >= 2:
    by_initials = [c for c in candidates if "_" in c and _initials(c) == word.lower()]
    if len(by_initials) == 1:
      return by_initials[0]
  close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
  return close[0] if close else None


def _abbreviation_of(word: str, candidates: list[str]) -> str | None:
  """The shortest candidate with the same first letter and ``word``'s letters in order."""
  def is_subsequence(short, long):
    letters = iter(long)
    return all(ch in letters for ch in short)
  if len(word) < 2:
    return None
  found = sorted((c for c in candidates if c[0] == word[0] and
                  is_subsequence(word.lower(), c.lower())), key=len)
  return found[0] if found else None


def suggest_key(path: str) -> str | None:
  """The existing dotted key closest to an unknown one: ``optim.lr`` -> ``optim.learning_rate``,
  ``batchsize`` -> ``batch_size``, ``lr`` -> ``optim.learning_rate`` (searched in every block)."""
  default = schema.default_config()
  node, prefix = default, []
  parts = path.split(".")
  for part in parts[:-1]:
    if part in node and isinstance(node[part], ml_collections.ConfigDict):
      node, prefix = node[part], prefix + [part]
    else:
      break
  leaf = parts[len(prefix)]
  local = list(node.keys())
  everywhere = {}
  for block, value in default.items():
    if isinstance(value, ml_collections.ConfigDict):
      for key in value.keys():
        everywhere.setdefault(key, f"{block}.{key}")
  for finder in (_close_match, _abbreviation_of):
    match = finder(leaf, local)
    if match is not None:
      return ".".join(prefix + [match])
    match = finder(leaf, list(everywhere))
    if match is not None:
      return everywhere[match]
  return None


def _spelled(node: ast.AST) -> list[str] | None:
  """The key names of ``a.optim.lr`` / ``a["optim"]["lr"]`` after the base (``["optim", "lr"]``);
  None for any other expression."""
  names = []
  while isinstance(node, (ast.Attribute, ast.Subscript)):
    if isinstance(node, ast.Attribute):
      names.append(node.attr)
    elif isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
      names.append(node.slice.value)
    else:
      return None
    node = node.value
  return names[::-1] or None


def locate_key(file: str, path: str) -> tuple[int, str] | None:
  """Where the config file ``file`` names the key ``path``: ``(line, the names spelled there)``.

  The key may be spelled whole (``config.optim.lr = ...``), by its end through a variable
  (``m = config.optim; m.lr = ...``), as a keyword (``update(lr=...)``) or a dict key. A whole
  spelling wins, then the first line. None when the file does not name it (set by a file it
  imports, or with ``setattr``) or cannot be read.
  """
  try:
    with open(file, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=file)
  except (OSError, SyntaxError, ValueError):
    return None
  parts = path.split(".")
  found = []  # (rank, line, spelled): rank 0 = the whole path, 1 = its end
  for node in ast.walk(tree):
    spelled = None
    if isinstance(node, (ast.Attribute, ast.Subscript)):
      spelled = _spelled(node)
    elif isinstance(node, ast.keyword) and node.arg is not None:
      spelled = [node.arg]
    elif isinstance(node, ast.Dict):
      for key in node.keys:
        if isinstance(key, ast.Constant) and key.value == parts[-1]:
          found.append((1, key.lineno, parts[-1]))
    if not spelled or spelled[-1] != parts[-1]:
      continue
    if spelled[-len(parts):] == parts:
      found.append((0, node.lineno, ".".join(spelled)))
    elif parts[-len(spelled):] == spelled:
      found.append((1, node.lineno, ".".join(spelled)))
  if not found:
    return None
  _, line, spelled = min(found)
  return line, spelled


def read_key_path(file: str, leaf: str) -> str:
  """The dotted key of ``leaf``, a key the config file ``file`` reads but the schema lacks: as the
  file spells it (``config.optim.lr`` -> ``optim.lr``) when the part before the leaf is a block of
  the schema, else ``leaf`` alone (e.g. read through a variable)."""
  where = locate_key(file, leaf)
  if where is not None:
    spelled = where[1].split(".")
    for start in range(len(spelled) - 1):
      block = ".".join(spelled[start:-1])
      if schema.key_exists(block):
        return f"{block}.{leaf}"
  return leaf


def unknown_key_message(paths: list[str], file: str | None = None) -> str:
  """One line for keys the schema lacks: the first the config file names (by line; else the first
  given), with its ``file:line`` and the closest existing key, then the others."""
  where = {path: locate_key(file, path) if file else None for path in paths}
  paths = sorted(paths, key=lambda p: (where[p] is None, where[p][0] if where[p] else 0))
  path = paths[0]
  suggestion = suggest_key(path)
  message = f"unknown config key {path!r}" + (
      f" in {file}:{where[path][0]}" if where[path] else "") + (
      f"; did you mean {suggestion!r}?" if suggestion else "")
  if len(paths) > 1:
    message += f" (also unknown: {', '.join(repr(p) for p in paths[1:])})"
  return message
