"""Class embeddings for zero-shot classification: prompt ensembles and per-class descriptions.

A class is represented by the average of the embeddings of several sentences about it, either
templates filled with its name ("a bad photo of a {}.") or sentences written for it (e.g. the
LLM-written descriptions of CuPL, stored as JSON ``{class: [sentence, ...]}``). CLIP's recipe:
L2-normalise each sentence embedding, average them, renormalise the mean. Normalising first
gives every phrasing the same weight whatever its norm.

The text encoder is passed in as a plain function ``list[str] -> [n, D] array``, so this module
knows nothing about tokenisers or models and can be tested with a fake encoder. Sentences of
several classes are encoded together in batches of ``batch_size`` (one class's 80 prompts alone
would leave an accelerator mostly idle), and only per-class running sums are kept, so memory is
``C x D`` whatever the number of prompts.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from align_jax.run import storage
from align_jax.evaluate.templates import TEMPLATES

__all__ = ["TEMPLATES", "class_embeddings", "load_descriptions", "template_list"]


def template_list(templates: str | Sequence[str] | None) -> tuple[str, ...]:
  """Resolves ``templates`` (a TEMPLATES name, a sequence of templates or None) and checks it."""
  if templates is None:
    return ("{}",)  # the bare class name.
  if isinstance(templates, str):
    if templates not in TEMPLATES:
      raise ValueError(f"unknown template set {templates!r}; use one of {sorted(TEMPLATES)} or "
                       'pass a list of templates such as ["a photo of a {}."].')
    return TEMPLATES[templates]
  found = tuple(templates)
  if not found:
    raise ValueError('templates is empty; pass at least one template such as "a photo of a {}.".')
  for template in found:
    if not isinstance(template, str) or "{}" not in template:
      raise ValueError(f'template {template!r} must be a string with one "{{}}" for the class '
                       'name, e.g. "a photo of a {}.".')
    try:
      template.format("x")
    except (IndexError, KeyError, ValueError) as error:
      raise ValueError(f"template {template!r} cannot be filled with one class name ({error}); "
                       'use a single "{}" and double any other braces ("{{", "}}").') from None
  return found


def _sentences(names: list[str], templates: str | Sequence[str] | None,
               descriptions: Mapping[str, Sequence[str]] | None) -> list[list[str]]:
  """Returns, for each class, the sentences whose embeddings are averaged."""
  if descriptions is None:
    filled = template_list(templates)
    return [[template.format(name) for template in filled] for name in names]
  if not isinstance(descriptions, Mapping):
    raise ValueError("descriptions must map class name -> list of sentences (see "
                     f"load_descriptions), got {type(descriptions).__name__}.")
  missing = [name for name in names if name not in descriptions]
  if missing:
    raise ValueError(f"descriptions lack {len(missing)} of {len(names)} classes (first: "
                     f"{missing[:5]}); add them to the description file or fix the class names.")
  result = []
  for name in names:
    sentences = descriptions[name]
    if (isinstance(sentences, str) or not isinstance(sentences, Sequence) or not sentences
        or not all(isinstance(s, str) and s.strip() for s in sentences)):
      raise ValueError(f"descriptions[{name!r}] must be a non-empty list of non-empty sentences, "
                       f"got {sentences!r}.")
    result.append(list(sentences))
  return result


def _encode(encode_texts: Callable[[list[str]], np.ndarray], batch: list[str],
            width: int | None) -> np.ndarray:
  """Encodes one batch, checks the output and returns its rows L2-normalised (float64)."""
  out = np.asarray(encode_texts(batch), dtype=np.float64)
  if out.ndim != 2 or out.shape[0] != len(batch) or (width is not None and out.shape[1] != width):
    expected = f'[{len(batch)}, {width if width is not None else "D"}]'
    raise ValueError(f"encode_texts returned shape {out.shape} for {len(batch)} texts; it must "
                     f"return one embedding per text, shape {expected}.")
  if not np.all(np.isfinite(out)):
    raise ValueError("encode_texts returned NaN or inf; check the text encoder.")
  norms = np.linalg.norm(out, axis=1, keepdims=True)
  if np.any(norms == 0):
    text = batch[int(np.flatnonzero(norms[:, 0] == 0)[0])]
    raise ValueError(f"encode_texts returned a zero vector for {text!r}; it cannot be normalised.")
  return out / norms


def class_embeddings(class_names: Sequence[str], encode_texts: Callable[[list[str]], np.ndarray],
                     templates: str | Sequence[str] | None = "imagenet80", *,
                     descriptions: Mapping[str, Sequence[str]] | None = None,
                     batch_size: int = 1024) -> np.ndarray:
  """Builds one L2-normalised embedding per class by averaging prompt embeddings (CLIP recipe).

  Args:
    class_names: the C class names, in label order.
    encode_texts: maps a list of n strings to an [n, D] array of text embeddings (any norm).
    templates: a name in ``TEMPLATES`` (e.g. ``"imagenet80"``, ``"simple"``), a sequence of
      templates each holding one ``{}``, or None for the bare class name. Ignored when
      ``descriptions`` is given.
    descriptions: optional mapping class name -> sentences, used instead of templates (e.g. from
      ``load_descriptions``); it must cover every class, extra entries are ignored.
    batch_size: most texts per ``encode_texts`` call; a batch spans several classes.

  Returns:
    [C, D] float32 class embeddings with unit L2 norm, row c for ``class_names[c]``.
  """
  if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not class_names:
    raise ValueError("class_names must be a non-empty list of strings.")
  names = list(class_names)
  if not all(isinstance(name, str) and name for name in names):
    raise ValueError("every class name must be a non-empty string.")
  if (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
      or batch_size < 1):
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
  per_class = _sentences(names, templates, descriptions)
  texts = [text for sentences in per_class for text in sentences]
  owner = np.repeat(np.arange(len(names)), [len(sentences) for sentences in per_class])
  sums = None
  for start in range(0, len(texts), batch_size):
    unit = _encode(encode_texts, texts[start:start + batch_size],
                   None if sums is None else sums.shape[1])
    if sums is None:
      sums = np.zeros((len(names), unit.shape[1]), np.float64)
    # Rows of one class are contiguous: sum each run with reduceat, then add it to its class.
    batch_owner = owner[start:start + batch_size]
    run_starts = np.flatnonzero(np.r_[True, batch_owner[1:] != batch_owner[:-1]])
    sums[batch_owner[run_starts]] += np.add.reduceat(unit, run_starts, axis=0)
  means = sums / np.bincount(owner, minlength=len(names))[:, None]
  norms = np.linalg.norm(means, axis=1, keepdims=True)
  if np.any(norms < 1e-12):
    name = names[int(np.flatnonzero(norms[:, 0] < 1e-12)[0])]
    raise ValueError(f"the sentence embeddings of class {name!r} average to zero; use other "
                     "templates or descriptions.")
  return (means / norms).astype(np.float32)


def load_descriptions(path: str | os.PathLike) -> dict[str, list[str]]:
  """Reads a per-class description file: a JSON object ``{class name: [sentence, ...]}``.

  Args:
    path: the JSON file (UTF-8).

  Returns:
    The mapping, with every value a non-empty list of non-empty strings.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file is not JSON of that form (the message says which entry is wrong).
  """
  path = os.fspath(path)
  try:
    data = json.loads(storage.read_text(path))  # a local path or a URL
  except FileNotFoundError:
    raise FileNotFoundError(f"description file {path!r} not found; pass the path of a JSON "
                            'file {"class name": ["sentence", ...], ...}.') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"description file {path!r} is not valid UTF-8 JSON ({error}).") from None
  if not isinstance(data, dict):
    raise ValueError(f"description file {path!r} must hold a JSON object "
                     f'{{"class name": ["sentence", ...]}}, got a {type(data).__name__}.')
  if not data:
    raise ValueError(f"description file {path!r} holds no classes.")
  for name, sentences in data.items():
    if (not isinstance(sentences, list) or not sentences
        or not all(isinstance(s, str) and s.strip() for s in sentences)):
      raise ValueError(f"description file {path!r}: entry {name!r} must be a non-empty list of "
                       f"non-empty strings, got {sentences!r}.")
  return data
