"""Input pipelines: image-caption records and stored features, as per-process slices of global batches.

The public names below are loaded on first use (PEP 562), so ``import align_jax.data.records``
does not pull in grain or the feature-store readers:

* sources for the trainer: :func:`make_train_source` (from ``config``), :func:`make_pair_source`
  (image-caption records through grain), :class:`ArrayPairSource` and
  :func:`load_stored_features` (stored or synthetic features);
* reading records: :func:`make_reader`, :func:`decode_image`, :class:`SkipCounter`,
  :func:`read_manifest_rows`; the (seed, epoch, process) order: :class:`EpochOrder`;
* image transforms: :class:`TrainTransform`, :class:`EvalTransform`.
"""

import importlib

# public name -> (module of align_jax.data, attribute)
_EXPORTS = {
    "make_train_source": ("factory", "make_train_source"),
    "make_pair_source": ("pipeline", "make_pair_source"),
    "ArrayPairSource": ("array_sources", "ArrayPairSource"),
    "load_stored_features": ("array_sources", "load_stored_features"),
    "make_reader": ("reader_factory", "make_reader"),
    "decode_image": ("records", "decode_image"),
    "SkipCounter": ("records", "SkipCounter"),
    "read_manifest_rows": ("manifest", "read_rows"),
    "EpochOrder": ("order", "EpochOrder"),
    "TrainTransform": ("transforms", "TrainTransform"),
    "EvalTransform": ("transforms", "EvalTransform"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'align_jax.data' has no attribute {name!r}")
  module, attribute = _EXPORTS[name]
  return getattr(importlib.import_module(f"align_jax.data.{module}"), attribute)
