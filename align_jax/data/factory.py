"""The input a config names: array-backed sources or the image-caption pipeline, for train and eval.

* ``synthetic`` / ``features``: pairs held in arrays (:mod:`align_jax.data.features`), for the
  demo's random encoders or stored encoder outputs.
* ``tfds`` / ``webdataset`` / ``manifest`` / ``synthetic_shapes``: raw images and captions
  (:mod:`align_jax.data.pipeline`), decoded, augmented with the paper's transforms, normalised with
  the image encoder's own mean/std and tokenized with the text encoder's tokenizer.
"""

from __future__ import annotations

import ml_collections

from align_jax.data import features

ARRAY_SOURCES = ("synthetic", "features")


def is_array_source(data_config) -> bool:
  return data_config.source in ARRAY_SOURCES


def _check_raw_encoders(model, data_config) -> None:
  for tower in ("image_encoder", "text_encoder"):
    if not hasattr(getattr(model, tower), "preprocess"):
      raise ValueError(f"data.source {data_config.source!r} yields raw images and captions, so "
                       f"config.model.{tower} must be a Hugging Face encoder (id or folder), not "
                       f"{getattr(model, tower).name!r}")


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
  _check_raw_encoders(model, data)
  from align_jax.data import pipeline
  return pipeline.make_pair_source(
      data, global_batch_size=config.batch_size, seed=config.seed,
      image_transform=make_image_transform(model, data, train=True),
      tokenize=model.text_encoder.preprocess, train=True)


def eval_data_config(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """``config.data`` with an evaluator's ``data`` overrides (e.g. another split or path)."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.update(dict(overrides or {}))
  return data
