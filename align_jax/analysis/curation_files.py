"""Curation over files: concept prototypes, the pool's caption features streamed, the subset written.

    python -m align_jax.cli.curate --pool=pool.jsonl --features=pool_text.npy \\
        --concepts=concepts.txt --text_encoder=sentence-transformers/all-roberta-large-v1 \\
        --top_k=50000 --quota=2000 --out=curated.jsonl

freeze-align's second pillar (RECIPES §1; the algorithm is :mod:`align_jax.analysis.curation`):
one prototype per concept — the concept's name in prompt templates through the text encoder
(``--concepts`` + ``--text_encoder``), or any precomputed ``[C, D]`` prototypes (``--prototypes``,
e.g. mean image embeddings of a few examples per concept) — scored against stored caption features
of the pool (``--features``: ``[N, D]`` .npy, row i = line i of the pool manifest, memory-mapped and
streamed in chunks), a running top-K per concept, then concepts hardest first take up to
``--quota`` unused samples each.

The output is a manifest the data pipeline reads directly (``data.source = "manifest"``): the
selected lines of the pool manifest, unchanged, plus ``concept`` and ``score``. The pool is read
twice as a stream, so memory is bounded by the chunk size and the selection, not the pool.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np

from align_jax.analysis import curation, text_length

logger = logging.getLogger("align_jax")


def load_concepts(path: str) -> list[str]:
  """Concept names, one per line (blank lines and # comments skipped)."""
  with open(path, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  if not names:
    raise ValueError(f"{path}: no concept names (one per line)")
  return names


def concept_prototypes(names: Sequence[str], text_encoder: str, templates: Sequence[str],
                       max_length: int | None = None) -> np.ndarray:
  """[C, D] prototypes: each name in every template, mean-pooled by the text encoder.

  ``max_length``: tokens per prompt; None: 77, or the encoder's limit when smaller.
  """
  from align_jax.encoders import TextEncoder
  max_length = text_length.choose(text_encoder, max_length)
  encoder = TextEncoder.from_pretrained(text_encoder, pooling="mean", max_length=max_length)
  return curation.text_prototypes(names, encoder.encode, templates)


def _pool_lines(path: str):
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        yield line


def curate_pool(pool: str, features: str, prototypes: np.ndarray, names: Sequence[str], *,
                top_k: int, quota: int, out: str, chunk_size: int = 65536) -> dict:
  """Selects from ``pool`` (JSONL) by its caption ``features`` and writes the curated manifest."""
  if not pool.endswith(".jsonl"):
    raise ValueError(f"--pool must be a JSONL manifest (one JSON object per line), got {pool!r}")
  feats = np.load(features, mmap_mode="r")
  count = sum(1 for _ in _pool_lines(pool))
  if feats.ndim != 2 or len(feats) != count:
    raise ValueError(f"{features}: expected [{count}, D] caption features (one row per line of "
                     f"{pool}), got shape {feats.shape}")
  selection_path = out + ".selection.jsonl"
  from tqdm import tqdm  # the console bar (tqdm.auto needs ipywidgets in notebooks)
  with tqdm(total=count, desc=f"scoring against {len(names):,} concepts", unit="caption",
            unit_scale=True) as bar:
    def chunks():
      for chunk_features, ids in curation.iter_feature_chunks(features, chunk_size):
        yield chunk_features, ids
        bar.update(len(ids))
    stats = curation.curate(chunks(), prototypes, names, top_k=top_k, quota=quota,
                            out_path=selection_path, progress=False)
  chosen = {row["id"]: row for row in curation.read_manifest(selection_path)}
  os.remove(selection_path)
  tmp = out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for index, line in enumerate(_pool_lines(pool)):
      if index in chosen:
        record = json.loads(line)
        record.update(concept=chosen[index]["concept"], score=chosen[index]["score"])
        f.write(json.dumps(record) + "\n")
  os.replace(tmp, out)
  stats["out_path"] = out
  return stats


def curate_from_files(pool: str, features: str, concepts: str, out: str, *,
                      text_encoder: str = "", prototypes: str = "",
                      templates: Sequence[str] = ("a photo of a {}.",),
                      max_text_length: int | None = None, top_k: int = 50000, quota: int = 2000,
                      chunk_size: int = 65536) -> dict:
  """The command's whole job (see the module docstring): concept names from ``concepts`` (one per
  line), their prototypes from ``text_encoder`` in ``templates`` or the ``[C, D]`` .npy
  ``prototypes`` (exactly one of the two), then :func:`curate_pool`; returns its statistics with
  ``num_concepts``. Raises ValueError naming the fix for bad input.
  """
  if bool(prototypes) == bool(text_encoder):
    raise ValueError("give either --text_encoder (prototypes from concept names) or "
                     "--prototypes (a [C, D] .npy)")
  names = load_concepts(concepts)
  if prototypes:
    vectors = np.load(prototypes)
  else:
    vectors = concept_prototypes(names, text_encoder, templates, max_text_length)
  stats = curate_pool(pool, features, vectors, names, top_k=top_k, quota=quota, out=out,
                      chunk_size=chunk_size)
  stats["num_concepts"] = len(names)
  return stats
