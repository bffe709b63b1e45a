"""Labelled image sets for zero-shot classification: TFDS builders and image-folder manifests.

A classification reader is a sized, random-access list of :class:`LabeledRecord` (encoded image
bytes + integer label) with ``class_names`` in label order, read the way the training pipeline
reads image-caption data (:mod:`align_jax.data.records`): images are decoded with
``records.decode`` and a record that cannot be used raises ``records.SkipRecord`` (counted,
logged and left out of the accuracy by the evaluator). Manifests are parsed by
:mod:`align_jax.data.manifest`, as the caption manifests are.

Two kinds of source, chosen by ``data.source``:

* ``tfds``: any TFDS builder prepared as ``array_record`` under ``data.data_dir`` (read with
  ``tfds.data_source``, no TensorFlow). Class names come from the label feature
  (``builder.info.features[label_key].names``), made readable CLIP-style (underscores -> spaces,
  SUN397's ``/a/abbey`` -> ``abbey``, CUB's ``001.Black_footed_Albatross`` -> ``Black footed
  Albatross``, EuroSAT's ``AnnualCrop`` -> ``annual crop``). ImageNet's TFDS labels are WordNet
  ids (``n01440764``), which no text encoder understands: pass ``class_names`` (a list, or a text
  file with one name per line, e.g. CLIP's 1000 ImageNet names) for ``imagenet2012`` /
  ``imagenet_v2``. :data:`SUITE` lists the paper's classification sets with their test split.
  Prepare one with ``tfds build NAME --data_dir=DIR --file_format=array_record`` (ImageNet needs
  its tar files placed in ``DIR/downloads/manual`` first).
* ``manifest``: a ``.jsonl`` or ``.csv`` file, one row per image: ``{"image": "path/to.jpg",
  "label": "golden retriever"}`` (a class name) or ``"label": 207`` (an index into
  ``class_names``). Paths are relative to ``data.image_root`` (default: the manifest's folder).
  With name labels and no ``class_names``, the classes are the sorted distinct names. For sets
  TFDS does not have (FGVC-Aircraft, Country211, ...).
* ``parquet``: Parquet files as the Hugging Face Hub publishes classification sets
  (``data.path``: a file, folder or glob; :mod:`align_jax.data.parquet`), an image column
  (``data.image_key``) and a label column (``label_key``, default ``label``) of class indices or
  names. Class names: ``class_names`` if given, else the ``ClassLabel`` names that ``datasets``
  stores in the file's metadata (made readable as TFDS's are), else the sorted distinct names.

Retrieval sets (image <-> text, :class:`align_jax.evaluate.evaluators.RetrievalEvaluator`) need
no code here: COCO 5k (Karpathy test split) is ``data=dict(source="tfds", name="coco_captions",
split="test")`` and Flickr30k 1k test is a caption manifest, ``data=dict(source="manifest",
path="flickr30k_test.jsonl")`` with rows ``{"image": ..., "caption": [5 captions]}``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from align_jax.run import storage
from align_jax.data import manifest
from align_jax.data import parquet
from align_jax.data import records
from align_jax.data import tfds_manifest_readers as sources
from align_jax.data import tfds_names


@dataclasses.dataclass(frozen=True)
class SuiteEntry:
  """Where a benchmark lives in TFDS: builder name, evaluation split and feature keys."""
  name: str
  split: str
  label_key: str = "label"
  image_key: str = "image"


# The zero-shot classification suite of freeze-align / CLIP that TFDS provides. The key is the
# short name an evaluator may use as ``data.name``; the builder is ``SuiteEntry.name``.
SUITE: dict[str, SuiteEntry] = {
    "imagenet2012": SuiteEntry("imagenet2012", "validation"),
    "imagenet_v2": SuiteEntry("imagenet_v2", "test"),
    "caltech101": SuiteEntry("caltech101", "test"),
    "oxford_iiit_pet": SuiteEntry("oxford_iiit_pet", "test"),
    "cars196": SuiteEntry("cars196", "test"),
    "oxford_flowers102": SuiteEntry("oxford_flowers102", "test"),
    "food101": SuiteEntry("food101", "validation"),
    "sun397": SuiteEntry("sun397", "test"),
    "dtd": SuiteEntry("dtd", "test"),
    "caltech_birds2011": SuiteEntry("caltech_birds2011", "test"),
    "eurosat": SuiteEntry("eurosat/rgb", "train"),  # TFDS has one split; VTAB uses train[-5400:]
    "resisc45": SuiteEntry("resisc45", "train"),
    "cifar10": SuiteEntry("cifar10", "test"),
    "cifar100": SuiteEntry("cifar100", "test"),
    "stl10": SuiteEntry("stl10", "test"),
}

_WORDNET_ID = re.compile(r"^n\d{8}$")


@dataclasses.dataclass(frozen=True)
class LabeledRecord:
  """One undecoded example: encoded image bytes (or a decoded uint8 array) and its label."""
  key: str
  image: bytes | np.ndarray
  label: int


def readable_class_name(name: str) -> str:
  """A raw dataset label as the words a caption would use (the fixes CLIP's class lists made)."""
  name = name.strip()
  if name.startswith("/") and len(name) > 3 and name[2] == "/":  # SUN397: /a/abbey, /b/bakery/shop
    name = name[3:]
  name = re.sub(r"^\d+\.", "", name)  # CUB-200: 001.Black_footed_Albatross
  if "_" not in name and " " not in name and re.search(r"[a-z][A-Z]", name):
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()  # EuroSAT: AnnualCrop
  return re.sub(r"\s+", " ", name.replace("_", " ").replace("/", " ")).strip()


def load_class_names(value: str | Sequence[str]) -> list[str]:
  """``class_names`` from a config: a list of names, or a text file with one name per line."""
  if isinstance(value, str):
    if not storage.isfile(value):
      raise ValueError(f"class_names file {value!r} not found; pass a list of names or a text "
                       "file with one class name per line, in label order.")
    names = [line.strip() for line in storage.read_text(value).splitlines() if line.strip()]
  else:
    names = [str(name) for name in value]
  if not names or not all(names):
    raise ValueError(f"class_names must hold at least one non-empty name, got {names[:5]!r}.")
  if len(set(names)) != len(names):
    raise ValueError("class_names holds duplicates; each class needs its own name.")
  return names


def _tfds_setup_hint(builder: str, data_dir: str | None) -> str:
  where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  return (f"looked for TFDS builder {builder!r} under {where}. Prepare it with `tfds build "
          f"{builder} --data_dir={data_dir or 'DIR'} --file_format=array_record` (ImageNet: put "
          "its tar files in DIR/downloads/manual first), then set data.data_dir; or describe the "
          "images in a manifest (data.source='manifest', data.path=FILE.jsonl with rows "
          '{"image": "path.jpg", "label": "class name"}).')


class TfdsClassificationReader:
  """A TFDS image-classification builder prepared as ``array_record``, read without TensorFlow."""

  def __init__(self, name: str, *, split: str | None = None, data_dir: str | None = None,
               image_key: str | None = None, label_key: str | None = None,
               class_names: Sequence[str] | None = None):
    import tensorflow_datasets as tfds  # Heavy import: only when this source is used.

    entry = SUITE.get(name, SuiteEntry(name, split or "test"))
    split = split or entry.split
    self._image_key = image_key or entry.image_key
    self._label_key = label_key or entry.label_key
    self.name = f"tfds {entry.name}[{split}]"
    try:
      self._source = tfds.data_source(entry.name, split=split, data_dir=data_dir, download=False,
                                      decoders={self._image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # TFDS raises several types for "not prepared" / "no such split".
      unknown = tfds_names.unknown_builder_message(entry.name, e)
      if unknown:
        raise FileNotFoundError(unknown) from None
      raise FileNotFoundError(f"cannot open {self.name}: {type(e).__name__}: {e}. "
                              + _tfds_setup_hint(entry.name, data_dir)) from None
    features = self._source.dataset_info.features
    for key in (self._image_key, self._label_key):
      if key not in features:
        raise ValueError(f"{self.name} has no feature {key!r}; its features are "
                         f"{sorted(features.keys())}: set data.image_key / data.label_key.")
    raw = list(getattr(features[self._label_key], "names", None) or [])
    if class_names is not None:
      self.class_names = load_class_names(class_names)
      if raw and len(raw) != len(self.class_names):
        raise ValueError(f"class_names has {len(self.class_names)} names but {self.name} has "
                         f"{len(raw)} classes; give one name per class, in label order.")
    elif not raw:
      raise ValueError(f"{self.name}: feature {self._label_key!r} has no class names; pass "
                       "class_names in the evaluator config.")
    elif any(_WORDNET_ID.match(n) for n in raw):
      raise ValueError(f"{self.name} labels are WordNet ids ({raw[0]}, ...), which a text encoder "
                       "cannot read; pass class_names= a list or a file of readable names (one "
                       "per line, in label order; e.g. CLIP's 1000 ImageNet class names).")
    elif all(n.isdigit() for n in raw):  # e.g. caltech_birds2011: ClassLabel(num_classes=200)
      raise ValueError(f"{self.name} labels are bare numbers ({raw[0]}, {raw[1 % len(raw)]}, "
                       "...), not class names; pass class_names= a list or a file of readable "
                       "names (one per line, in label order).")
    else:
      self.class_names = [readable_class_name(n) for n in raw]
    if len(self._source) == 0:
      raise ValueError(f"{self.name} is empty; check data.split.")

  def __len__(self) -> int:
    return len(self._source)

  def read(self, index: int) -> LabeledRecord:
    key, example = sources.read_tfds_example(self._source, index, self.name)
    return LabeledRecord(key, sources.tfds_image(example[self._image_key]),
                         int(example[self._label_key]))


def _label_rows(path: str, image_key: str, label_key: str) -> list[tuple[str, Any]]:
  """(image path, raw label) per row of a JSONL or CSV manifest; bad rows raise with the line."""
  rows, is_csv = [], storage.extension(path) == ".csv"
  for row in manifest.read_rows(path, image_key=image_key,
                                columns={label_key: "data.label_key"}):
    if row.error is None and row.fields.get(label_key) is None:
      row = manifest.Row(row.line, None, ("bad_manifest_row", f"no {label_key!r} value"))
    if row.error is not None:
      raise ValueError(f"manifest {path!r} line {row.line}: {row.error[1]}; need a string "
                       f"{image_key!r} and a {label_key!r} (class name or index) per row.")
    label = row.fields[label_key]
    if is_csv:  # CSV cells are text: "207" is an index, anything else a class name
      label = label.strip()
      try:
        label.encode("utf-8")
      except UnicodeEncodeError:
        raise ValueError(f"manifest {path!r} line {row.line}: label is not UTF-8.") from None
      label = int(label) if re.fullmatch(r"\d+", label) else label
    rows.append((row.fields[image_key], label))
  if not rows:
    raise ValueError(f"manifest {path!r} has no rows.")
  return rows


class ManifestClassificationReader:
  """Images listed in a JSONL/CSV manifest with a class name or index per row."""

  def __init__(self, path: str, *, image_root: str = "", image_key: str = "image",
               label_key: str = "label", class_names: Sequence[str] | None = None):
    if not storage.isfile(path):
      raise FileNotFoundError(
          f"classification manifest {path!r} not found. Write a .jsonl file with one row per "
          'image, {"image": "relative/path.jpg", "label": "class name" or class index}, and set '
          "data.path (and data.image_root if the paths are not relative to the manifest).")
    self.name = f"manifest {path}"
    self._root = image_root or storage.dirname(path)
    rows = _label_rows(path, image_key, label_key)
    names = None if class_names is None else load_class_names(class_names)
    if names is None:
      if any(not isinstance(label, str) for _, label in rows):
        raise ValueError(f"manifest {path!r} has integer labels; pass class_names (a list or a "
                         "file with one name per line) so the labels can be named.")
      names = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(names)}
    self.class_names = names
    self._images, labels = [], []
    for image, label in rows:
      if isinstance(label, str):
        if label not in index:
          raise ValueError(f"manifest {path!r}: label {label!r} of {image!r} is not in "
                           f"class_names ({len(names)} names, first {names[:5]}).")
        label = index[label]
      if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(names):
        raise ValueError(f"manifest {path!r}: label {label!r} of {image!r} must be a class name "
                         f"or an index in [0, {len(names)}).")
      self._images.append(image)
      labels.append(label)
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._images)

  def read(self, index: int) -> LabeledRecord:
    image = self._images[index]
    file = image if storage.is_absolute(image) else storage.join(self._root, image)
    return LabeledRecord(file, records.read_file(file), int(self.labels[index]))


class ParquetClassificationReader:
  """Labelled images of Parquet files: an image column and a label column (index or name).

  The label column is read whole when the reader opens (a few bytes per image) and checked as a
  manifest's labels are: a row without a usable label stops with a ValueError naming it.
  """

  def __init__(self, path: str | Sequence[str], *, image_root: str = "", image_key: str = "image",
               label_key: str = "label", class_names: Sequence[str] | None = None):
    self._image_key = image_key
    self._table = parquet.ParquetTable(path, {image_key: "data.image_key",
                                              label_key: "data.label_key"}, image_root=image_root)
    self.name = self._table.name
    if len(self._table) == 0:
      raise ValueError(f"{self.name} has no rows (unreadable files: {self._table.index_skips}).")
    raw = parquet.read_column(self._table.files, label_key)
    names = None if class_names is None else load_class_names(class_names)
    if names is None:
      feature = parquet.huggingface_features(self._table.schema).get(label_key) or {}
      stored = feature.get("names") if isinstance(feature, dict) else None
      if stored:
        names = [readable_class_name(str(n)) for n in stored]
      elif any(not isinstance(label, str) for label in raw if label is not None):
        raise ValueError(f"{self.name} has integer labels and its metadata names no classes; "
                         "pass class_names (a list or a file with one name per line).")
      else:
        names = sorted({label for label in raw if label is not None})
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for row, label in enumerate(raw):
      if isinstance(label, str):
        if label not in index:
          raise ValueError(f"{self.name}: label {label!r} of row {row} is not in class_names "
                           f"({len(names)} names, first {names[:5]}).")
        label = index[label]
      if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(names):
        raise ValueError(f"{self.name}: label {label!r} of row {row} must be a class name or an "
                         f"index in [0, {len(names)}).")
      labels.append(label)
    self.class_names = names
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._table)

  def read(self, index: int) -> LabeledRecord:
    file, _, _ = self._table.locate(index)
    key, row = self._table.row(index)
    return LabeledRecord(key, self._table.image(row[self._image_key], key, file),
                         int(self.labels[index]))


def make_classification_reader(data_config: Any, class_names: Sequence[str] | str | None = None):
  """The reader ``data_config.source`` names ("tfds", "manifest" or "parquet"), with its class
  names."""
  source = data_config.get("source")
  label_key = data_config.get("label_key") or "label"
  if source == "tfds":
    name = data_config.get("name")
    if not name:
      raise ValueError(f"data.name is required for a TFDS classification set; one of "
                       f"{sorted(SUITE)} or any prepared TFDS builder.")
    return TfdsClassificationReader(
        name, split=data_config.get("split") or None,
        data_dir=data_config.get("data_dir") or None,
        image_key=data_config.get("image_key") or None, label_key=label_key,
        class_names=class_names)
  if source == "manifest":
    path = data_config.get("path")
    if not path:
      raise ValueError("data.path is required for a manifest classification set (a .jsonl or "
                       ".csv file with image and label columns).")
    return ManifestClassificationReader(
        path, image_root=data_config.get("image_root") or "",
        image_key=data_config.get("image_key") or "image", label_key=label_key,
        class_names=class_names)
  if source == "parquet":
    path = data_config.get("path")
    if not path:
      raise ValueError("data.path is required for a Parquet classification set (.parquet files "
                       "with an image and a label column).")
    return ParquetClassificationReader(
        path, image_root=data_config.get("image_root") or "",
        image_key=data_config.get("image_key") or "image", label_key=label_key,
        class_names=class_names)
  raise ValueError(f"zero-shot data.source is {source!r}; use 'tfds' (data.name, data.split, "
                   "data.data_dir), 'manifest' (data.path: image + label per row) or 'parquet' "
                   "(data.path: Parquet files with image and label columns).")
