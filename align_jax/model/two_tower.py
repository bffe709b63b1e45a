"""Two towers: frozen encoders + trainable projectors -> L2-normalised embeddings, and the logit params.

Trainable parameters form one pytree ``{"image": ..., "text": ..., "logit": ...}`` — the projectors
and the temperature (softmax loss) or scale and bias (sigmoid loss), which the loss kind
(:mod:`align_jax.objectives.kinds`) creates and clamps. Frozen encoder parameters are a
separate pytree ``{"image": ..., "text": ...}`` passed as its own argument, read under
``stop_gradient`` and never seen by the optimiser.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from align_jax.encoders import factory as encoder_factory
from align_jax.model import interfaces, ops, projectors
from align_jax.objectives import kinds as loss_kinds
from align_jax.parallel import mesh as sharding


# config.model.dropout_rng_impl: jax PRNG implementations for the dropout masks
DROPOUT_RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# XLA's RngBitGenerator: the SPMD partitioner computes its output whole on every device.
UNPARTITIONED_RNG_IMPLS = ("rbg", "unsafe_rbg")


def dropout_key(rng: jax.Array, impl: str) -> jax.Array:
  """The dropout key of implementation ``impl`` drawn from ``rng`` (a threefry key, raw or typed).

  As big_vision and MaxText choose a faster PRNG than threefry for dropout: "threefry2x32"
  returns ``rng`` itself; "rbg" / "unsafe_rbg" (XLA's RngBitGenerator) get key data of their own
  drawn from ``rng`` with threefry. The step's key is thus still a pure function of the state's
  key and the step, so a resumed run draws the same masks; unlike threefry, rbg masks of a
  sharded array depend on how it is sharded (a resume on another mesh draws other masks).
  """
  if _check_rng_impl(impl) == "threefry2x32":
    return rng
  data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl)))
  return jax.random.wrap_key_data(jax.random.bits(rng, data.shape, data.dtype), impl=impl)


def _check_rng_impl(impl: str) -> str:
  if impl not in DROPOUT_RNG_IMPLS:
    raise ValueError(f"unknown dropout PRNG {impl!r}: set --config.model.dropout_rng_impl to one "
                     f"of {DROPOUT_RNG_IMPLS}")
  return impl


@dataclasses.dataclass(frozen=True)
class AlignModel:
  """Frozen image/text encoders and their trainable projectors.

  Attributes:
    image_encoder / text_encoder: :class:`align_jax.model.interfaces.FrozenEncoder`s, ``params`` and a
      pure ``apply(params, inputs)`` returning features (:mod:`align_jax.model.projectors` convention).
    image_projector / text_projector: Flax modules mapping features to embeddings.
    loss_config: ``config.loss``; its loss kind (:mod:`align_jax.objectives.kinds`) owns the logit
      params.
  """
  image_encoder: interfaces.FrozenEncoder
  text_encoder: interfaces.FrozenEncoder
  image_projector: nn.Module
  text_projector: nn.Module
  loss_config: ml_collections.ConfigDict
  encoder_micro_batch: int = 0  # rows per device per encoder call; 0 = the whole batch at once
  projector_micro_batch: int = 0  # rows per device per (rematerialised) projector call; 0 = all
  mesh: Any = None  # needed only for micro-batching
  batch_axes: tuple = ("data",)
  dropout_rng_impl: str = "threefry2x32"  # see dropout_key

  def frozen_params(self) -> dict:
    return {"image": self.image_encoder.params, "text": self.text_encoder.params}

  def encoder_revisions(self) -> dict:
    """{"image": commit, "text": commit}: the hub commit each encoder's id resolved to, "" for a
    local folder or a toy encoder; recorded in the run's config.json and the feature store's
    fingerprint, so features from another revision of the same hub id are noticed."""
    return {tower: getattr(encoder, "revision", None) or ""
            for tower, encoder in (("image", self.image_encoder), ("text", self.text_encoder))}

  def encode(self, frozen: dict, batch: dict) -> tuple[dict, dict]:
    """Runs the frozen encoders; no gradient flows into them or their params."""
    frozen = jax.lax.stop_gradient(frozen)
    image = self.apply_encoder(self.image_encoder, frozen["image"], batch["image"])
    text = self.apply_encoder(self.text_encoder, frozen["text"], batch["text"])
    return jax.lax.stop_gradient(image), jax.lax.stop_gradient(text)

  def apply_encoder(self, encoder: interfaces.FrozenEncoder, params: Any, inputs: dict) -> dict:
    """One frozen encoder's features of ``inputs``, micro-batched by ``encoder_micro_batch``.

    No ``stop_gradient``: :meth:`encode` adds it for training; evaluation and feature extraction
    take no gradient.
    """
    if not self.encoder_micro_batch or self.mesh is None:
      return encoder.apply(params, inputs)
    return sharding.map_micro_batches(
        lambda chunk: encoder.apply(params, chunk), inputs, micro_batch=self.encoder_micro_batch,
        mesh=self.mesh, batch_axes=self.batch_axes)

  def init(self, rng: jax.Array, frozen: dict, batch: dict) -> dict:
    """Initial trainable params, shaped from one (small) example batch."""
    image, text = self.encode(frozen, batch)
    image_rng, text_rng = jax.random.split(rng)
    return {"image": self.image_projector.init(image_rng, image)["params"],
            "text": self.text_projector.init(text_rng, text)["params"],
            "logit": loss_kinds.get(self.loss_config).init_params()}

  def project(self, params: dict, image: dict, text: dict, *, train: bool = False,
              rng: jax.Array | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Features -> L2-normalised float32 embeddings ([B, embed_dim] each).

    ``rng`` (training only) is the step's threefry key; dropout draws from
    ``dropout_key(rng, dropout_rng_impl)``.
    """
    image_rng = text_rng = None
    if train and rng is not None:
      image_rng, text_rng = jax.random.split(dropout_key(rng, self.dropout_rng_impl))
    return (self._project(self.image_projector, params["image"], image, train, image_rng),
            self._project(self.text_projector, params["text"], text, train, text_rng))

  def _project(self, module: nn.Module, params: dict, features: dict, train: bool,
               rng: jax.Array | None) -> jnp.ndarray:
    """One tower's projector; with ``projector_micro_batch``, chunk by chunk and rematerialised.

    Micro-batched, the backward pass recomputes each chunk's activations (``jax.checkpoint``)
    instead of keeping them for the whole batch — GradCache's point (RECIPES §4) without its
    second pass, since the frozen encoders need no gradient: activation memory is one chunk's.
    The loop runs per device (:func:`align_jax.parallel.mesh.map_micro_batches_per_device`), so no
    chunk value, dropout masks included, is ever made for all devices' rows (issue 24: XLA does
    not partition rbg's RngBitGenerator). Each chunk's dropout key is folded from the global
    index of its first row: masks depend on the mesh and the micro-batch, not on the step's
    other inputs, and a resume on the same mesh draws the same ones. Training with an rbg dropout
    PRNG on a mesh runs per device even without micro-batches (one chunk per device, not
    rematerialised), for the same reason; threefry masks GSPMD partitions, so those runs keep
    the global loop-free path and its mesh-independent masks.
    """
    def apply(params, feats, key):
      rngs = {"dropout": key} if key is not None else None
      return module.apply({"params": params}, feats, train=train, rngs=rngs)

    # rbg masks drawn for the whole batch would sit whole on every device (issue 24): with
    # dropout, such a run's projectors go per device even without micro-batches.
    unpartitioned_masks = rng is not None and self.dropout_rng_impl in UNPARTITIONED_RNG_IMPLS
    if self.mesh is None or not (self.projector_micro_batch or unpartitioned_masks):
      return ops.l2_normalize(apply(params, features, rng))

    def chunk(shared, inputs):
      (params, key), (feats, rows) = shared, inputs
      return apply(params, feats, None if key is None else jax.random.fold_in(key, rows[0]))

    rows = jnp.arange(jax.tree.leaves(features)[0].shape[0])
    z = sharding.map_micro_batches_per_device(
        jax.checkpoint(chunk) if self.projector_micro_batch else chunk,
        (params, rng), (features, rows),
        micro_batch=self.projector_micro_batch, mesh=self.mesh, batch_axes=self.batch_axes)
    return ops.l2_normalize(z)

  def embed_images(self, params: dict, frozen: dict, inputs: dict) -> jnp.ndarray:
    """Image-tower inputs -> normalised embeddings (evaluation, inference)."""
    features = self.apply_encoder(self.image_encoder, frozen["image"], inputs)
    return self._project(self.image_projector, params["image"], features, False, None)

  def embed_texts(self, params: dict, frozen: dict, inputs: dict) -> jnp.ndarray:
    """Text-tower inputs -> normalised embeddings (evaluation, inference)."""
    features = self.apply_encoder(self.text_encoder, frozen["text"], inputs)
    return self._project(self.text_projector, params["text"], features, False, None)

  def embed(self, params: dict, frozen: dict, batch: dict, *, train: bool = False,
            rng: jax.Array | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Raw batch -> frozen encoders -> projectors -> normalised embeddings."""
    image, text = self.encode(frozen, batch)
    return self.project(params, image, text, train=train, rng=rng)


def build_model(config: ml_collections.ConfigDict, mesh=None, abstract: bool = False) -> AlignModel:
  """The model a config describes (``mesh`` enables encoder micro-batching).

  ``abstract=True``: the frozen params are shapes only
  (:func:`align_jax.encoders.factory.build_encoder`); for align_jax.train.aot.
  """
  return AlignModel(
      image_encoder=encoder_factory.build_encoder(config.model.image_encoder, config, "image", abstract),
      text_encoder=encoder_factory.build_encoder(config.model.text_encoder, config, "text", abstract),
      image_projector=projectors.make_projector(config.model.image_projector, config.model),
      text_projector=projectors.make_projector(config.model.text_projector, config.model),
      loss_config=config.loss, encoder_micro_batch=config.model.encoder_micro_batch,
      projector_micro_batch=config.model.projector_micro_batch, mesh=mesh,
      batch_axes=tuple(config.mesh.batch_axes),
      dropout_rng_impl=_check_rng_impl(config.model.dropout_rng_impl))
