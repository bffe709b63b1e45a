"""Zero-shot image classification: images against prompt-ensemble class embeddings (CLIP protocol).

Config (an entry of ``config.evals``)::

    config.evals.imagenet = dict(
        type="zero_shot",
        data=dict(source="tfds", name="imagenet2012", data_dir="/data/tfds"),  # or a manifest
        class_names="/data/imagenet_classnames.txt",  # optional: list or file; default: dataset's
        templates="imagenet80",  # or "imagenet7", "simple", or a list such as ["a photo of a {}."]
        descriptions="",  # optional JSON {class name: [sentences]} instead of templates (CuPL);
                          # keyed by the class names the evaluator uses (after readable fixes)
        batch_size=1024, ks=(1, 5), every=0, prefix="eval/")

writes ``{prefix}{name}_top{k}`` for each ``k`` (here ``eval/imagenet_top1``,
``eval/imagenet_top5``): the fraction of images whose label is among the ``k`` classes most
similar to the image, ties counted in the image's favour (:func:`metrics.zero_shot_accuracy`);
and ``{prefix}{name}_mean_per_class_recall``: the top-1 accuracy of each class, averaged over the
classes (which weighs small classes as much as large ones; clip_benchmark reports it).

``data`` overrides ``config.data`` (decode limits, threads, ``data_dir``); when it names no
``split``, a builder of :data:`datasets.SUITE` uses its evaluation split. Each image is decoded and
resized + centre-cropped with the training pipeline's evaluation transform, embedded once per run
by the jitted image tower with the batch sharded over the mesh (each process decodes only its rows
of each global batch), and the class embeddings are rebuilt every run from the current text
projector. Images that cannot be read are skipped, counted in ``evaluator.skipped``
(``data/skipped_<reason>``, as in the training pipeline) and logged; accuracy is over the others.
"""

from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np

from align_jax.model import interfaces
from align_jax.data import factory, reader_factory as readers, records
from align_jax.evaluate import datasets, embedding, metrics, prompts

logger = logging.getLogger("align_jax")


class ZeroShotEvaluator:
  """Zero-shot top-k accuracy of the current params on one labelled image set."""
  KEYS = ("type", "every", "prefix", "data", "batch_size", "templates", "descriptions",
          "class_names", "ks")

  def __init__(self, name: str, eval_config, config: ml_collections.ConfigDict, model, mesh):
    for tower in ("image_encoder", "text_encoder"):
      if getattr(model, tower).input_kind != interfaces.RAW:
        raise ValueError(f"config.evals.{name} (zero_shot) needs raw images and prompts, so "
                         f"config.model.{tower} must be a Hugging Face encoder (id or folder), "
                         "not stored features or the demo's random networks.")
    self.name = name
    self.every = eval_config.get("every", 0) or config.eval_every
    self.prefix = eval_config.get("prefix", "eval/")
    self.ks = metrics.cutoffs(tuple(eval_config.get("ks", (1, 5))), f"config.evals.{name}.ks")
    self.mesh, self.model = mesh, model
    overrides = dict(eval_config.get("data", None) or {})
    self.data = factory.eval_data_config(config, overrides)
    self.data.split = overrides.get("split", "")  # "": the suite's evaluation split
    class_names = eval_config.get("class_names", None) or None
    if class_names is not None and not isinstance(class_names, str):
      class_names = list(class_names)
    self.reader = datasets.make_classification_reader(self.data, class_names)
    self.class_names = list(self.reader.class_names)
    templates = eval_config.get("templates", "imagenet80")
    self.templates = templates if isinstance(templates, str) else list(templates)
    prompts.template_list(self.templates)  # bad templates fail now, not at the first evaluation
    path = eval_config.get("descriptions", "") or ""
    self.descriptions = prompts.load_descriptions(path) if path else None
    self.embedder = embedding.Embedder(model, config, mesh, eval_config.get("batch_size", 1024))
    self.transform = factory.make_image_transform(model, self.data, train=False)
    self.limits = readers.decode_limits(self.data)
    self.num_threads = max(1, int(self.data.num_threads))
    self.prefetch = max(1, int(self.data.prefetch))
    self._skips = records.SkipCounter(f"zero-shot {name}", logger)

  @property
  def skipped(self) -> dict[str, int]:
    """The last pass's skipped records, ``{"data/skipped_<reason>": count}``."""
    return dict(self._skips.counts)

  def is_due(self, step: int, is_last: bool) -> bool:
    return is_last or step % self.every == 0

  def _load(self, index: int) -> tuple[np.ndarray | None, int, records.SkipRecord | None]:
    """(pixels, label, None) for a usable record, (None, -1, the SkipRecord) otherwise."""
    try:
      record = self.reader.read(index)
      image, _ = records.decode(record, self.limits, captions=False)
    except records.SkipRecord as e:
      return None, -1, e
    return np.asarray(self.transform(image), np.float32), record.label, None

  def image_embeddings(self, params, frozen) -> tuple[np.ndarray, np.ndarray]:
    """([N, D] embeddings, [N] labels) of every readable image, in dataset order."""
    embedder, n = self.embedder, len(self.reader)
    size = self.model.image_encoder.image_size
    local, offset = embedder.local, jax.process_index() * embedder.local
    self._skips = records.SkipCounter(f"zero-shot {self.name}", logger)
    starts = range(0, n, embedder.batch_size)
    # This process's rows of every global batch, read ahead in order.
    mine = [[i for i in range(start + offset, start + offset + local) if i < n]
            for start in starts]
    loaded = records.load_in_order(self._load, [i for rows in mine for i in rows],
                                   num_threads=self.num_threads, prefetch=self.prefetch)
    embeddings, labels = [], []
    for rows in mine:
      pixels = np.zeros((local, size, size, 3), np.float32)
      label = np.full((local,), -1, np.int32)  # -1: padding row or skipped image
      for row in range(len(rows)):
        image, y, skip = next(loaded)
        if skip is not None:
          self._skips.add(skip.reason, skip.detail)
        else:
          pixels[row], label[row] = image, y
      batch = embedder.to_device({"pixel_values": pixels})
      z = embedding.host_gather(embedder.images(params, frozen, batch))
      global_label = embedding.host_gather(label)
      keep = global_label >= 0
      embeddings.append(z[keep])
      labels.append(global_label[keep])
    labels = np.concatenate(labels)
    if labels.size == 0:
      raise ValueError(f"{self.reader.name}: no readable image (skip counts: {self.skipped}); "
                       "fix the data.")
    return np.concatenate(embeddings), labels

  def encode_texts(self, params, frozen, texts: list[str]) -> np.ndarray:
    """Embeddings of ``texts`` by the text tower, in fixed-size sharded batches."""
    from align_jax.data import pipeline  # grain-based; only for raw-data evaluation
    embedder, parts = self.embedder, []
    for tokens, valid in pipeline.text_batches(texts, self.model.text_encoder.preprocess,
                                               embedder.batch_size):
      batch = embedder.to_device(embedder.local_rows(tokens))
      z = embedding.host_gather(embedder.texts(params, frozen, batch))
      parts.append(z[valid])
    return np.concatenate(parts)

  def class_embeddings(self, params, frozen) -> np.ndarray:
    """[C, D] prompt-ensemble (or description) embeddings of the classes, in label order."""
    return prompts.class_embeddings(
        self.class_names, lambda texts: self.encode_texts(params, frozen, texts),
        self.templates, descriptions=self.descriptions, batch_size=self.embedder.batch_size)

  def run(self, params, frozen) -> dict[str, float]:
    images, labels = self.image_embeddings(params, frozen)
    classes = self.class_embeddings(params, frozen)
    self._skips.summary(f"zero-shot {self.name}")
    accuracy = metrics.zero_shot_accuracy(images, labels, classes, k=self.ks, mesh=self.mesh,
                                          mean_per_class=True)
    return {f"{self.prefix}{self.name}_{key}": value for key, value in accuracy.items()}
