"""Evaluators run during training (and standalone), chosen by name in ``config.evals``.

Each entry of ``config.evals`` is ``name -> {type, every, prefix, data, ...}``: ``type`` picks a
class from :data:`EVALUATORS` (an explicit registry, as Scenic's), ``every`` is in steps (0 means
``config.eval_every``), ``prefix`` starts every metric key (default ``"eval/"``, so retrieval
writes ``eval/i2t@1``, ``eval/t2i@1``, ...) and ``data`` overrides keys of ``config.data`` for the
evaluation set (e.g. ``{"split": "heldout"}`` or ``{"path": "/data/val_features"}``).

Types: ``retrieval`` (below) and ``zero_shot`` (:mod:`align_jax.evaluate.zero_shot`).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from align_jax.data import factory
from align_jax.data import array_sources as features_data
from align_jax.evaluate import embedding
from align_jax.evaluate import metrics
from align_jax.evaluate import zero_shot


class RetrievalEvaluator:
  """Image<->text recall@K; every caption of an image counts as its match (COCO / Flickr protocol).

  Keys: ``data`` (overrides of config.data), ``batch_size`` (global, for embedding), ``ks``.
  """
  KEYS = ("type", "every", "prefix", "data", "batch_size", "ks")

  def __init__(self, name: str, eval_config, config, model, mesh):
    self.name = name
    self.every = eval_config.get("every", 0) or config.eval_every
    self.prefix = eval_config.get("prefix", "eval/")
    self.ks = tuple(eval_config.get("ks", (1, 5, 10)))
    self.mesh, self.model = mesh, model
    self.data = factory.eval_data_config(config, eval_config.get("data", None), name=name)
    self.embedder = embedding.Embedder(model, config, mesh, eval_config.get("batch_size", 1024))
    if not factory.is_array_source(self.data):
      factory.check_raw_encoders(model, self.data, where=f"config.evals.{name}")
    else:
      self.source = features_data.make_array_source(
          self.data, split=self.data.split, global_batch_size=self.embedder.batch_size, seed=0,
          shuffle=False)

  def is_due(self, step: int, is_last: bool) -> bool:
    return is_last or step % self.every == 0

  def embeddings(self, params, frozen) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image embeddings, text embeddings, text_to_image) of the whole evaluation set."""
    if factory.is_array_source(self.data):
      return self._array_embeddings(params, frozen)
    return self._pipeline_embeddings(params, frozen)

  def _array_embeddings(self, params, frozen):
    embedder, towers = self.embedder, {}
    for tower, embed in (("image", embedder.images), ("text", embedder.texts)):
      parts = []
      for local_batch, _ in self.source.tower_batches(tower, embedder.batch_size):
        z = embed(params, frozen, embedder.to_device(local_batch))
        parts.append(embedding.host_gather(z))
      towers[tower] = np.concatenate(parts)
    text_to_image = self.source.text_to_image
    return (towers["image"][:self.source.num_pairs], towers["text"][:len(text_to_image)],
            text_to_image)

  def _pipeline_embeddings(self, params, frozen):
    from align_jax.data import pipeline
    model, embedder = self.model, self.embedder
    # Every process reads the whole (small) evaluation set, so captions and text_to_image are
    # global; each then puts its own rows of every batch on the mesh.
    source = pipeline.make_pair_source(
        self.data, global_batch_size=embedder.batch_size, seed=0,
        image_transform=factory.make_image_transform(model, self.data, train=False),
        tokenize=model.text_encoder.preprocess, process_index=0, process_count=1, train=False)
    images = []
    for batch in source:
      pixels = embedder.to_device(embedder.local_rows(batch["image"]))
      z = embedding.host_gather(embedder.images(params, frozen, pixels))
      images.append(z[batch["valid"]])
    texts = []
    for text_batch, valid in pipeline.text_batches(source.captions_flat,
                                                    model.text_encoder.preprocess,
                                                    embedder.batch_size):
      batch = embedder.to_device(embedder.local_rows(text_batch))
      z = embedding.host_gather(embedder.texts(params, frozen, batch))
      texts.append(z[valid])
    return np.concatenate(images), np.concatenate(texts), source.text_to_image

  def run(self, params, frozen) -> dict[str, float]:
    image, text, text_to_image = self.embeddings(params, frozen)
    recall = metrics.retrieval_recall(image, text, text_to_image, k=self.ks, mesh=self.mesh)
    return {self.prefix + key: float(value) for key, value in recall.items()}


EVALUATORS = {"retrieval": RetrievalEvaluator,
              "zero_shot": zero_shot.ZeroShotEvaluator}


def build_evaluators(config: ml_collections.ConfigDict, model, mesh) -> list:
  """One evaluator per entry of ``config.evals``; unknown types and keys raise with the valid ones."""
  built = []
  for name, eval_config in config.evals.items():
    kind = eval_config.get("type")
    if kind not in EVALUATORS:
      raise ValueError(f"config.evals.{name}.type is {kind!r}; choose one of {sorted(EVALUATORS)}")
    cls = EVALUATORS[kind]
    unknown = sorted(set(eval_config.keys()) - set(cls.KEYS))
    if unknown:
      raise ValueError(f"config.evals.{name} has unknown keys {unknown}; valid keys: {cls.KEYS}")
    built.append(cls(name, eval_config, config, model, mesh))
  return built
