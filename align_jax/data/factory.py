"""The input a config names: array-backed sources or the image-caption pipeline, for train and eval.

* ``synthetic`` / ``features``: pairs held in arrays (:mod:`align_jax.data.array_sources`), for the
  demo's random encoders or stored encoder outputs.
* ``tfds`` / ``webdataset`` / ``manifest`` / ``parquet`` / ``synthetic_shapes``: raw images and
  captions (:mod:`align_jax.data.pipeline`), decoded, augmented with the paper's transforms,
  normalised with the image encoder's own mean/std and tokenized with the text encoder's
  tokenizer.
"""

from __future__ import annotations

import ml_collections

from align_jax.model import interfaces
from align_jax.run import storage
from align_jax.data import array_sources as features, reader_factory as readers

ARRAY_SOURCES = ("synthetic", "features")
# every data.source: the array sources, then the image-caption readers' (readers.READERS)
SOURCES = ARRAY_SOURCES + tuple(readers.READERS)


def is_array_source(data_config) -> bool:
  return data_config.source in ARRAY_SOURCES


def check_raw_encoders(model, data_config, where: str = "") -> None:
  """Raw images and captions need Hugging Face encoders (not stored features or random MLPs)."""
  for tower in ("image_encoder", "text_encoder"):
    if getattr(model, tower).input_kind != interfaces.RAW:
      raise ValueError(f"{where + ': ' if where else ''}data.source {data_config.source!r} yields "
                       f"raw images and captions, so config.model.{tower} must be a Hugging Face "
                       f"encoder (id or folder), not {getattr(model, tower).name!r}")


def make_image_transform(model, data_config, *, train: bool):
  from align_jax.data import transforms  # PIL-based; only for raw-image sources
  encoder = model.image_encoder
  return transforms.make_image_transform(
      encoder.image_size, train=train, mean=encoder.mean, std=encoder.std,
      randaugment=train and bool(data_config.randaugment), scale=tuple(data_config.crop_scale),
      flip=bool(data_config.flip))


def make_train_source(config: ml_collections.ConfigDict, model):
  """Endless, resumable training batches (this process's rows) for ``config.data``."""
  data = config.data
  if is_array_source(data):
    return features.make_array_source(data, split=data.split, global_batch_size=config.batch_size,
                                      seed=config.seed,
                                      captions_per_image=data.captions_per_image)
  check_raw_encoders(model, data)
  from align_jax.data import pipeline
  data = resolve_split(data)
  return pipeline.make_pair_source(
      data, global_batch_size=config.batch_size, seed=config.seed,
      image_transform=make_image_transform(model, data, train=True),
      tokenize=model.text_encoder.preprocess, train=True)


# sources whose files are the split
_SPLIT_FILES = {"manifest": "path", "parquet": "path", "webdataset": "urls"}


def resolve_split(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``data`` with ``{split}`` in ``data.path`` / ``data.urls`` replaced by its split."""
  data = ml_collections.ConfigDict(data.to_dict())
  key = _SPLIT_FILES.get(data.source)
  if key and isinstance(data.get(key), str) and "{split}" in data[key]:
    data[key] = data[key].replace("{split}", data.split)
  return data


def eval_data_config(config: ml_collections.ConfigDict, overrides,
                     name: str = "") -> ml_collections.ConfigDict:
  """``config.data`` with an evaluator's ``data`` overrides, resolved to the split it names.

  How each source finds a split other than the training one (a split that cannot be found is an
  error, never the training data):

  * ``synthetic`` / ``synthetic_shapes``: the split itself ("train", "heldout");
    ``tfds``: the TFDS split;
  * ``manifest`` / ``parquet`` / ``webdataset``: ``{split}`` in ``data.path`` / ``data.urls``
    (e.g. ``captions_{split}.jsonl``, ``data/{split}-*.parquet``), or the evaluator's own
    ``path`` / ``urls``;
  * ``features``: ``<data.path>/<split>`` (``--mode=extract_features`` writes every evaluator's
    split there), or the evaluator's own ``path`` (then the store's own split, unless it also
    names one, which must match the store's).
  """
  overrides = dict(overrides or {})
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.update(overrides)
  where = f"config.evals.{name}" if name else "the evaluator"
  other_split = data.split != config.data.split
  if data.source == "features":
    if "path" not in overrides and other_split:
      if not config.data.path:
        raise ValueError(f"{where} reads split {data.split!r} of stored features, but "
                         "config.data.path is empty")
      data.path = storage.join(config.data.path, data.split)
    elif "path" in overrides and "split" not in overrides:
      data.split = ""  # the evaluator names its store: whatever split it holds
    return data
  key = _SPLIT_FILES.get(data.source)
  if key:
    value = data.get(key) or ""
    if "{split}" not in value and other_split and value == (config.data.get(key) or ""):
      raise ValueError(
          f"{where} asks for split {data.split!r}, but data.source={data.source!r} has no "
          f"splits: data.{key} {value!r} is the training data. Set {where}.data.{key} to the "
          f"{data.split!r} files, or write '{{split}}' in data.{key} (e.g. "
          f"'captions_{{split}}.jsonl')")
  return resolve_split(data)
