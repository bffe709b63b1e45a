"""Tiny TFDS datasets written through the real TFDS builders' own code, without TensorFlow.

``write_tfds(data_dir, "oxford_iiit_pet", {"test": (images, labels)})`` prepares the registered builder
(its version, features and class names: Pets' 37 breeds, ImageNet's 1,000 WordNet ids, ...) as
``array_record`` under ``data_dir`` with the given encoded images and labels, so a test reads it
exactly as a prepared download. Other features get fixed placeholder values.
"""

import io

import numpy as np
from PIL import Image


def _fake_value(feature, key: str, image: bytes, label: int):
  """A value of ``feature`` that TFDS can encode without TensorFlow (images as PNG bytes)."""
  import tensorflow_datasets as tfds
  f = tfds.features
  if isinstance(feature, f.FeaturesDict):
    return {k: _fake_value(sub, k, image, label) for k, sub in feature.items()}
  if isinstance(feature, f.Sequence):
    inner = feature.feature
    return {k: [] for k in inner.keys()} if isinstance(inner, f.FeaturesDict) else []
  if isinstance(feature, f.Image):
    if key == "image":
      return image
    buf = io.BytesIO()
    Image.new("L" if feature.shape[-1] == 1 else "RGB", (4, 4)).save(buf, "PNG")
    return buf.getvalue()
  if isinstance(feature, f.ClassLabel):
    return label if key == "label" else 0
  if isinstance(feature, f.BBoxFeature):
    return f.BBox(0.0, 0.0, 1.0, 1.0)
  if isinstance(feature, f.Text):
    return "x"
  return np.zeros([d or 1 for d in feature.shape], feature.np_dtype)


def write_tfds(data_dir: str, name: str, splits: dict[str, tuple[list[bytes], list[int]]],
               label_names: list[str] | None = None):
  """Prepares TFDS builder ``name`` (its own code and features) as array_record: ``splits`` maps a
  split name to (encoded images, labels). ``label_names`` sets the names of builders that read
  them from their download (CIFAR: ``fine_label_names.txt``), as their preparation does."""
  import tensorflow_datasets as tfds
  builder_name, _, config = name.partition("/")

  class Tiny(tfds.builder_cls(builder_name), skip_registration=True):
    def _split_generators(self, dl_manager):
      del dl_manager
      if label_names is not None:
        self.info.features["label"].names = label_names
      return {split: self._generate_examples(*data) for split, data in splits.items()}

    def _generate_examples(self, images, labels):
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, _fake_value(self.info.features, "", image, label)

  Tiny.name = builder_name
  Tiny(data_dir=data_dir, file_format="array_record",
       **({"config": config} if config else {})).download_and_prepare()
