"""The contrastive loss kinds (``config.loss.name``), each owning its learnable logit params.

One object per loss name holds everything that depends on which loss a run trains with, so the
model, the trainer, inference and export ask it instead of testing for parameter names:

* ``init_params()``: the learnable logit params, stored under ``params["logit"]`` (float32
  scalars, in log space where the value must stay positive). Their names are fixed: checkpoints
  and exports written since the first release hold them.
* ``clamp(logit)``: the params projected back into their allowed range after each update (as
  open_clip does).
* ``loss_args(logit)``: the loss's scalar arguments, traceable (the trainer logs them as
  ``train/<name>``); ``host_loss_args(logit)`` the same as Python floats (inference, model card).
* ``sharded_loss(mesh, batch_axes)``: ``(z_image, z_text, loss args) -> scalar`` over the global
  batch under ``shard_map`` (:mod:`align_jax.objectives.contrastive`, with ``loss.impl`` / ``loss.block_size``).
* ``logits(similarity, args)``: the loss's logits from cosine similarities ``img @ txt.T``, in
  any array module: what the losses built on a kind score
  (:mod:`align_jax.objectives.multi_positive`, :mod:`align_jax.objectives.cwcl`), so they take
  the logit scale from the kind instead of reading its arguments by name.
* ``probabilities(image_emb, class_emb, args)``: zero-shot class probabilities computed as the
  loss scores a pair (softmax over classes, or one sigmoid per class).

    kind = loss_kinds.get(config.loss)        # SoftmaxLoss or SigmoidLoss, bound to config.loss
    params["logit"] = kind.init_params()

The names are ``NAMES``: ``align_jax.objectives.config_checks`` registers them as the choices of
``loss.name``.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np

from align_jax.objectives import contrastive as losses


class LossKind(abc.ABC):
  """A contrastive loss and its logit params, bound to a ``config.loss`` block.

  Subclasses set ``name`` (the ``config.loss.name`` value), ``param_names`` (the keys of
  ``params["logit"]``) and ``arg_names``, and implement the abstract methods.
  """
  name: str = ""
  param_names: tuple[str, ...] = ()
  arg_names: tuple[str, ...] = ()  # keys of loss_args, in the loss function's argument order

  def __init__(self, loss_config: ml_collections.ConfigDict):
    self.config = loss_config

  @abc.abstractmethod
  def init_params(self) -> dict:
    """The initial logit params: float32 scalars named ``param_names``."""

  @abc.abstractmethod
  def clamp(self, logit: Mapping[str, Any]) -> dict:
    """``logit`` projected back into its allowed range (after each optimiser update)."""

  @abc.abstractmethod
  def _args(self, logit: Mapping[str, Any], xp) -> dict:
    """The loss arguments from the logit params, with array module ``xp`` (jnp or np)."""

  @abc.abstractmethod
  def logits(self, similarity: Any, args: Mapping[str, Any]) -> Any:
    """The loss's logits from cosine similarities ``similarity`` (``img @ txt.T``, any array
    module) and its ``loss_args``."""

  @abc.abstractmethod
  def probabilities(self, image_emb: Any, class_emb: Any, args: Mapping[str, float]
                    ) -> np.ndarray:
    """[N, C] float32 class probabilities of unit image embeddings against class embeddings."""

  def _check(self, logit: Mapping[str, Any]) -> None:
    if set(logit) != set(self.param_names):
      raise ValueError(
          f"the logit params hold {sorted(logit)}, but loss {self.name!r} has "
          f"{sorted(self.param_names)}: load the params with the config of the run that trained "
          "them (its loss.name)")

  def loss_args(self, logit: Mapping[str, Any]) -> dict:
    """The loss's scalar arguments (``arg_names``) from the logit params; traceable."""
    self._check(logit)
    return self._args(logit, jnp)

  def host_loss_args(self, logit: Mapping[str, Any]) -> dict[str, float]:
    """``loss_args`` computed on the host in numpy, as Python floats (inference, model card)."""
    self._check(logit)
    host = {k: np.asarray(v) for k, v in logit.items()}
    return {k: float(v) for k, v in self._args(host, np).items()}

  def _loss_kwargs(self) -> dict:
    kwargs = {}
    if self.config.impl:
      kwargs["impl"] = self.config.impl
    if self.config.block_size:
      kwargs["block_size"] = self.config.block_size
    return kwargs

  @abc.abstractmethod
  def _loss_function(self) -> Callable[..., Any]:
    """The :mod:`align_jax.objectives.contrastive` function, called as ``fn(img, txt, *args in arg_names)``."""

  def sharded_loss(self, mesh, batch_axes) -> Callable[[Any, Any, Mapping[str, Any]], Any]:
    """``(z_image, z_text, loss args) -> scalar loss`` over the global batch, sharded over the mesh."""
    sharded = losses.shard_loss(self._loss_function(), mesh, tuple(batch_axes),
                                **self._loss_kwargs())
    names = self.arg_names
    return lambda zi, zt, args: sharded(zi, zt, *(args[n] for n in names))


class SoftmaxLoss(LossKind):
  """CLIP's symmetric InfoNCE; learns ``log_temperature``, clipped to [temperature_min, _max]."""
  name = "softmax"
  param_names = ("log_temperature",)
  arg_names = ("temperature",)

  def init_params(self) -> dict:
    return {"log_temperature": jnp.asarray(math.log(self.config.temperature_init), jnp.float32)}

  def clamp(self, logit):
    return {"log_temperature": jnp.clip(logit["log_temperature"],
                                        math.log(self.config.temperature_min),
                                        math.log(self.config.temperature_max))}

  def _args(self, logit, xp):
    return {"temperature": xp.exp(logit["log_temperature"])}

  def _loss_function(self):
    return losses.softmax_loss

  def logits(self, similarity, args):
    """``similarity / temperature``."""
    return similarity / args["temperature"]

  def probabilities(self, image_emb, class_emb, args):
    """``softmax(image_emb @ class_emb.T / temperature)`` over classes (rows sum to 1)."""
    logits = self.logits(np.asarray(image_emb, np.float64) @ np.asarray(class_emb, np.float64).T,
                         args)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


class SigmoidLoss(LossKind):
  """SigLIP's pairwise sigmoid loss; learns ``log_scale`` (capped at scale_max) and ``bias``."""
  name = "sigmoid"
  param_names = ("log_scale", "bias")
  arg_names = ("scale", "bias")

  def init_params(self) -> dict:
    return {"log_scale": jnp.asarray(math.log(self.config.scale_init), jnp.float32),
            "bias": jnp.asarray(self.config.bias_init, jnp.float32)}

  def clamp(self, logit):
    return {"log_scale": jnp.minimum(logit["log_scale"], math.log(self.config.scale_max)),
            "bias": logit["bias"]}

  def _args(self, logit, xp):
    return {"scale": xp.exp(logit["log_scale"]), "bias": logit["bias"]}

  def _loss_function(self):
    return losses.sigmoid_loss

  def logits(self, similarity, args):
    """``scale * similarity + bias``."""
    return args["scale"] * similarity + args["bias"]

  def probabilities(self, image_emb, class_emb, args):
    """``sigmoid(scale * image_emb @ class_emb.T + bias)``: one independent probability per class."""
    logits = self.logits(np.asarray(image_emb, np.float64) @ np.asarray(class_emb, np.float64).T,
                         args)
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


KINDS: dict[str, type[LossKind]] = {cls.name: cls for cls in (SoftmaxLoss, SigmoidLoss)}
NAMES = tuple(KINDS)


def get(loss_config: ml_collections.ConfigDict) -> LossKind:
  """The loss kind ``loss_config.name`` names, bound to ``loss_config`` (``config.loss``)."""
  try:
    cls = KINDS[loss_config.name]
  except KeyError:
    raise ValueError(f"unknown loss {loss_config.name!r}: set --config.loss.name to one of "
                     f"{', '.join(repr(n) for n in NAMES)}") from None
  return cls(loss_config)
