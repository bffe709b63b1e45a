"""The record reader a data config names, built from the locked schema's values.

One factory for the image-caption readers (``tfds``, ``webdataset``, ``manifest``, ``parquet``,
``synthetic_shapes``), used by training, evaluation, feature extraction and encoder selection.
It lives apart from the readers themselves (:mod:`align_jax.data.tfds_manifest_readers`,
:mod:`align_jax.data.webdataset`, :mod:`align_jax.data.parquet`,
:mod:`align_jax.data.synthetic_images`), which all build on
:mod:`align_jax.data.records`, so the module graph has no cycle.

Every key a reader takes comes from the schema (:func:`align_jax.config.schema.default_config`): a
data config that leaves a key out (a test's or a command's partial ``ConfigDict``) gets the schema's
value, never a second default written here (:func:`with_schema`).
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from align_jax.config import schema as config_lib
from align_jax.data import parquet
from align_jax.data import records
from align_jax.data import tfds_manifest_readers as sources
from align_jax.data import synthetic_images
from align_jax.data import webdataset


def with_schema(data_config: Any) -> ml_collections.ConfigDict:
  """``data_config`` over the schema's ``data`` block: keys it does not set take the schema's.

  Keys the schema does not have (an evaluator's ``label_key``) are kept as given.
  """
  values = config_lib.default_config().data.to_dict()
  given = data_config.to_dict() if isinstance(data_config, ml_collections.ConfigDict) else dict(
      data_config)
  values.update(given)
  return ml_collections.ConfigDict(values)


def decode_limits(data_config: Any) -> records.DecodeLimits:
  """The image size limits ``data.max_image_pixels`` / ``data.min_image_size`` (schema-filled)."""
  data = with_schema(data_config)
  return records.DecodeLimits(max_pixels=int(data.max_image_pixels),
                              min_size=int(data.min_image_size))


def _require(data: ml_collections.ConfigDict, key: str) -> Any:
  value = data.get(key)
  if value in (None, ""):
    raise ValueError(f"data.{key} is required for data.source={data.source!r}")
  return value


def _tfds(data: ml_collections.ConfigDict) -> records.RecordReader:
  return sources.TfdsReader(
      _require(data, "name"), split=data.split, data_dir=data.data_dir or None,
      image_key=data.image_key or "image", caption_key=data.caption_key or "captions/text")


def _webdataset(data: ml_collections.ConfigDict) -> records.RecordReader:
  return webdataset.WebDatasetReader(
      _require(data, "urls"), caption_key=data.caption_key or "caption",
      index_cache_dir=data.index_cache_dir or None)


def _manifest(data: ml_collections.ConfigDict) -> records.RecordReader:
  return sources.ManifestReader(
      _require(data, "path"), image_root=data.image_root, image_key=data.image_key or "image",
      caption_key=data.caption_key or "caption")


def _parquet(data: ml_collections.ConfigDict) -> records.RecordReader:
  return parquet.ParquetReader(
      _require(data, "path"), image_root=data.image_root, image_key=data.image_key or "image",
      caption_key=data.caption_key or "caption")


def _synthetic_shapes(data: ml_collections.ConfigDict) -> records.RecordReader:
  return synthetic_images.ShapesReader(split=data.split, num_records=int(data.num_pairs),
                                       seed=int(data.data_seed))


# data.source -> the reader built from a schema-filled data config: the image-caption sources
READERS: dict[str, Callable[[ml_collections.ConfigDict], records.RecordReader]] = {
    "tfds": _tfds,
    "webdataset": _webdataset,
    "manifest": _manifest,
    "parquet": _parquet,
    "synthetic_shapes": _synthetic_shapes,
}


def make_reader(data_config: Any) -> records.RecordReader:
  """The reader named by ``data_config.source``, one of :data:`READERS`."""
  data = with_schema(data_config)
  build = READERS.get(data.source)
  if build is None:
    raise ValueError(f"unknown data.source {data.source!r}; expected one of "
                     f"{', '.join(repr(name) for name in READERS)} (stored features and the "
                     "synthetic latent world are built by align_jax.data.array_sources)")
  return build(data)
