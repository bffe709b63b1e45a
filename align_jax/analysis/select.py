"""Encoder-pair selection: which frozen image and text encoders are already most alike?

    python -m align_jax.cli.select --source=manifest --path=coco_val.jsonl \\
        --image_encoders=facebook/dinov2-large,google/vit-large-patch16-224 \\
        --text_encoders=sentence-transformers/all-roberta-large-v1,bert-large-uncased \\
        --num_images=5000 --out=/tmp/selection [--layers]

freeze-align's first pillar (RECIPES §1): on a few thousand image-caption pairs, the image
features (mean of the last hidden states over patches) and the caption features (mean-pooled
sentence embedding, averaged over each image's captions) of every candidate encoder are compared
with linear CKA (and mutual k-NN); higher CKA went with better retrieval after alignment. Writes
``ranking.md`` and ``ranking.json`` (pairs best first) and ``cka_heatmap.png`` (image encoders x
text encoders). With ``--layers`` every layer of every encoder is scored too and the best-aligned
layer pair of each encoder pair is reported (STRUCTURE's observation, RECIPES §5).

It also writes ``best_config_overrides.txt``, the chosen pair as config overrides, one flag a line
(absl flagfile syntax), ready for training::

    python main.py --config=configs/dinov2_roberta.py \\
        --flagfile=/tmp/selection/best_config_overrides.txt --workdir=...

That is the best pair by final-layer CKA with ``model.image_layer`` / ``model.text_layer`` -1; with
``--layers``, the pair and layers of the highest CKA over every layer pair of every encoder pair
(layer indices as :mod:`align_jax.encoders.layers` counts them; the final output written -1).

Records come from the image-caption readers (:func:`align_jax.data.reader_factory.make_reader`: manifest,
tfds, webdataset, synthetic_shapes), read and decoded as training reads them; unreadable records
are skipped and counted. Each encoder
preprocesses images with its own Hugging Face processor.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, Sequence

import jax
import numpy as np
from PIL import Image

from align_jax.analysis import plotting
from align_jax.analysis import cka, text_length
from align_jax.data import reader_factory as readers
from align_jax.data import records

logger = logging.getLogger("align_jax")


def read_pairs(data_config, num_images: int) -> tuple[list[Image.Image], list[list[str]], dict]:
  """The first ``num_images`` readable records: decoded RGB images, their captions, skip counts.

  Read and decoded as training reads them (:mod:`align_jax.data.records`, with the config's
  ``data.max_image_pixels`` / ``data.min_image_size``); skips are ``data/skipped_<reason>``.
  """
  reader = readers.make_reader(data_config)
  limits = readers.decode_limits(data_config)
  skips = records.SkipCounter(reader.name, logger, reader.index_skips)
  images, captions = [], []
  for index in range(len(reader)):
    if len(images) == num_images:
      break
    try:
      image, texts = records.decode(reader.read(index), limits)
    except records.SkipRecord as skip:
      skips.add(skip.reason, skip.detail)
      continue
    images.append(image)
    captions.append(texts)
  if len(images) < 2:
    raise ValueError(f"{reader.name}: fewer than 2 readable image-caption pairs "
                     f"(skipped: {skips.counts})")
  return images, captions, dict(skips.counts)


def _batched(fn, inputs: dict, batch_size: int, progress: Callable[[int], object] | None = None
             ) -> np.ndarray:
  """``fn`` over ``inputs`` in fixed-size batches (the last one padded), concatenated on axis -2.

  ``progress(1)`` is called after each batch (a progress bar's ``update``).
  """
  n = len(next(iter(inputs.values())))
  outs = []
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in inputs.items()}
    pad = batch_size - len(next(iter(chunk.values())))
    chunk = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) if pad else v
             for k, v in chunk.items()}
    out = np.asarray(fn(chunk))
    outs.append(out[..., :batch_size - pad, :])
    if progress is not None:
      progress(1)
  return np.concatenate(outs, axis=-2)


def image_features(name: str, images: list, *, layers: bool, batch_size: int,
                   progress: Callable[[int], object] | None = None) -> np.ndarray:
  """[layers, N, D] (or [1, N, D]): mean-patch features of every (or the last) layer."""
  from align_jax.encoders import ImageEncoder
  encoder = ImageEncoder.from_pretrained(name, pooling="mean")
  pixels = encoder.preprocess(images)
  if layers:
    return _batched(jax.jit(lambda x: encoder.apply_all_layers(encoder.params, x)), pixels,
                    batch_size, progress)
  return _batched(jax.jit(lambda x: encoder.apply(encoder.params, x)["pooled"]), pixels,
                  batch_size, progress)[None]


def text_features(name: str, captions: list[list[str]], *, layers: bool, batch_size: int,
                  max_length: int | None = None,
                  progress: Callable[[int], object] | None = None) -> np.ndarray:
  """[layers, N, D]: mean-pooled caption features, averaged over each image's captions.

  ``max_length``: tokens per caption; None: 77, or the encoder's limit when smaller
  (:mod:`align_jax.analysis.text_length`).
  """
  from align_jax.encoders import TextEncoder
  max_length = text_length.choose(name, max_length)
  encoder = TextEncoder.from_pretrained(name, pooling="mean", max_length=max_length)
  flat = [c for texts in captions for c in texts]
  owner = np.repeat(np.arange(len(captions)), [len(texts) for texts in captions])
  tokens = encoder.preprocess(flat)
  if layers:
    feats = _batched(jax.jit(lambda x: encoder.apply_all_layers(encoder.params, x)), tokens,
                     batch_size, progress)
  else:
    feats = _batched(jax.jit(lambda x: encoder.apply(encoder.params, x)["pooled"]), tokens,
                     batch_size, progress)[None]
  sums = np.zeros((feats.shape[0], len(captions), feats.shape[-1]), np.float64)
  for layer in range(feats.shape[0]):
    np.add.at(sums[layer], owner, feats[layer])
  return (sums / np.bincount(owner)[None, :, None]).astype(np.float32)


def score_pairs(image_feats: dict[str, np.ndarray], text_feats: dict[str, np.ndarray], *,
                knn_k: int = 10, mesh=None) -> list[dict]:
  """Every (image, text) encoder pair scored on its last layers, and on its best layer pair."""
  rows = []
  for image_name, x in image_feats.items():
    for text_name, y in text_feats.items():
      k = min(knn_k, len(x[-1]) - 1)
      row = {"image_encoder": image_name, "text_encoder": text_name,
             "linear_cka": cka.linear_cka(x[-1], y[-1], mesh=mesh),
             "mutual_knn": cka.mutual_knn(x[-1], y[-1], k=k)}
      if len(x) > 1 or len(y) > 1:
        grid = np.array([[cka.linear_cka(xi, yj, mesh=mesh) for yj in y] for xi in x])
        best = np.unravel_index(np.argmax(grid), grid.shape)
        row.update(best_image_layer=int(best[0]), best_text_layer=int(best[1]),
                   best_layer_cka=float(grid[best]), layer_cka=grid.round(6).tolist())
      rows.append(row)
  return sorted(rows, key=lambda r: -r["linear_cka"])


def config_layer(index: int, num_layers: int) -> int:
  """A layer as ``model.image_layer`` / ``model.text_layer`` takes it: the final output (the last of
  the ``num_layers`` scored, index ``num_layers - 1``) is -1, any other layer its index."""
  return -1 if index == num_layers - 1 else int(index)


def best_layers(row: dict) -> tuple[int, int]:
  """(image, text) best layers of a ``--layers`` row, as the config and the overrides file take
  them (:func:`config_layer`)."""
  return (config_layer(row["best_image_layer"], len(row["layer_cka"])),
          config_layer(row["best_text_layer"], len(row["layer_cka"][0])))


def write_ranking(rows: list[dict], out_dir: str) -> None:
  with open(os.path.join(out_dir, "ranking.json"), "w") as f:
    json.dump(rows, f, indent=1)
  layered = "best_layer_cka" in rows[0]
  lines = ["| rank | image encoder | text encoder | linear CKA | mutual k-NN |"
           + (" best layers (image, text; -1 = final) | CKA there |" if layered else ""),
           "|---|---|---|---|---|" + ("---|---|" if layered else "")]
  for rank, r in enumerate(rows, 1):
    line = (f"| {rank} | {r['image_encoder']} | {r['text_encoder']} | {r['linear_cka']:.4f} | "
            f"{r['mutual_knn']:.4f} |")
    if layered:
      image_layer, text_layer = best_layers(r)
      line += f" {image_layer}, {text_layer} | {r['best_layer_cka']:.4f} |"
    lines.append(line)
  with open(os.path.join(out_dir, "ranking.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


OVERRIDES_FILE = "best_config_overrides.txt"


def best_overrides(rows: list[dict]) -> tuple[dict, list[str]]:
  """The chosen row and its config override flags (see the module docstring)."""
  if "best_layer_cka" not in rows[0]:
    best, image_layer, text_layer = rows[0], -1, -1
    how = f"best pair by final-layer linear CKA ({best['linear_cka']:.4f})"
  else:
    best = max(rows, key=lambda r: r["best_layer_cka"])
    image_layer, text_layer = best_layers(best)
    how = (f"best pair and layers by linear CKA over every layer pair "
           f"({best['best_layer_cka']:.4f}; final layers: {best['linear_cka']:.4f})")
  return best, [
      f"# python -m align_jax.cli.select: {how}; features scored with mean pooling",
      f"# use: python main.py --config=CONFIG --flagfile={OVERRIDES_FILE} ...",
      f"--config.model.image_encoder={best['image_encoder']}",
      f"--config.model.text_encoder={best['text_encoder']}",
      f"--config.model.image_layer={image_layer}",
      f"--config.model.text_layer={text_layer}"]


def write_overrides(rows: list[dict], out_dir: str) -> str:
  """Writes ``best_config_overrides.txt`` into ``out_dir``; returns its path."""
  path = os.path.join(out_dir, OVERRIDES_FILE)
  with open(path, "w") as f:
    f.write("\n".join(best_overrides(rows)[1]) + "\n")
  return path


def write_heatmap(rows: list[dict], image_names: Sequence[str], text_names: Sequence[str],
                  path: str) -> str:
  """PNG of final-layer linear CKA (:func:`align_jax.analysis.plotting.cka_heatmap`): one row per image
  encoder, one column per text encoder, full names, values in the cells, a colour bar."""
  value = {(r["image_encoder"], r["text_encoder"]): r["linear_cka"] for r in rows}
  grid = [[value[(i, t)] for t in text_names] for i in image_names]
  return plotting.cka_heatmap(grid, image_names, text_names, path,
                              title=f"Linear CKA of frozen encoder features (final layers, "
                                    f"{rows[0].get('num_pairs', 'N')} image-caption pairs)")


def select_encoders(data_config, image_encoders: Sequence[str], text_encoders: Sequence[str],
                    out_dir: str, *, num_images: int = 5000, layers: bool = False,
                    batch_size: int = 64, max_text_length: int | None = None) -> list[dict]:
  """Scores every pair and writes ranking.md / ranking.json / cka_heatmap.png and the best pair's
  config overrides (best_config_overrides.txt); returns the rows.

  ``max_text_length``: tokens per caption; None: 77, or each text encoder's limit when smaller.
  A progress bar counts the encoded batches of every candidate.
  """
  if not image_encoders or not text_encoders:
    raise ValueError("give at least one image encoder and one text encoder")
  os.makedirs(out_dir, exist_ok=True)
  images, captions, skipped = read_pairs(data_config, num_images)
  logger.info("scoring on %d image-caption pairs (skipped: %s)", len(images), skipped)
  for name in text_encoders:  # a --max_text_length too long for one of them: now, in one line
    text_length.choose(name, max_text_length)
  from tqdm import tqdm  # the console bar (tqdm.auto needs ipywidgets in notebooks)
  num_texts = sum(len(texts) for texts in captions)
  total = (len(image_encoders) * math.ceil(len(images) / batch_size)
           + len(text_encoders) * math.ceil(num_texts / batch_size))
  with tqdm(total=total, desc=f"encoding {len(images)} pairs with "
            f"{len(image_encoders) + len(text_encoders)} encoders", unit="batch") as bar:
    image_feats = {name: image_features(name, images, layers=layers, batch_size=batch_size,
                                        progress=bar.update) for name in image_encoders}
    text_feats = {name: text_features(name, captions, layers=layers, batch_size=batch_size,
                                      max_length=max_text_length, progress=bar.update)
                  for name in text_encoders}
  rows = score_pairs(image_feats, text_feats)
  for row in rows:
    row["num_pairs"] = len(images)
  write_ranking(rows, out_dir)
  write_overrides(rows, out_dir)
  write_heatmap(rows, image_encoders, text_encoders, os.path.join(out_dir, "cka_heatmap.png"))
  return rows
