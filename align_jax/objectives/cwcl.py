"""CWCL: softmax targets from the frozen features' intra-modal similarity (``loss.cwcl_weight``).

Srinivasa et al., "CWCL: Cross-modal transfer with continuously weighted contrastive loss",
NeurIPS 2023, eq. 3; ``loss.cwcl_weight`` = 0 is off, 1 the paper's loss, in between a mix with
CLIP's loss. For the softmax loss only (the config check says so).

:func:`cwcl_loss` takes the run's loss kind (:mod:`align_jax.objectives.kinds`) and scores its
logits (``kind.logits``: the similarities over the learnt temperature);
:func:`cwcl_softmax_loss` is the same loss with the temperature given. Written on the global
(sharded) arrays inside the jitted step, the gathered form of
:mod:`align_jax.objectives.contrastive`: the logits and target matrices are row-sharded, and the
values and gradients equal one device's.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from align_jax.model import ops
from align_jax.objectives import contrastive
from align_jax.objectives.kinds import LossKind


def cwcl_weights(features: jnp.ndarray) -> jnp.ndarray:
  """CWCL's continuous weights, row-normalised: w_ij = (1 + cos(f_i, f_j)) / 2, then w_ij / Σ_j w_ij."""
  f = ops.l2_normalize(features)
  w = 0.5 * (1.0 + f @ f.T)
  return w / jnp.sum(w, axis=1, keepdims=True)


def _loss(logits, image_features, text_features, weight, mesh, batch_axes):
  logits = contrastive.row_sharded(logits, mesh, batch_axes)
  eye = jnp.eye(logits.shape[0], dtype=jnp.float32)
  w_text = contrastive.row_sharded(cwcl_weights(text_features), mesh, batch_axes)
  w_image = contrastive.row_sharded(cwcl_weights(image_features), mesh, batch_axes)
  return contrastive.soft_target_softmax_loss(logits, (1 - weight) * eye + weight * w_text,
                                              (1 - weight) * eye + weight * w_image)


def cwcl_loss(kind: LossKind, img: jnp.ndarray, txt: jnp.ndarray, args: Mapping[str, Any],
              image_features: jnp.ndarray, text_features: jnp.ndarray, weight: float = 1.0, *,
              mesh=None, batch_axes=("data",)) -> jnp.ndarray:
  """:func:`cwcl_softmax_loss` at the temperature of ``kind``, a softmax loss kind.

  ``args``: ``kind.loss_args`` of the logit params; the logits are ``kind.logits`` of the
  similarities.
  """
  if kind.name != "softmax":
    raise ValueError("loss.cwcl_weight is for the softmax loss: set loss.name=softmax or "
                     "loss.cwcl_weight=0")
  logits = kind.logits(contrastive.similarities(img, txt), args)
  return _loss(logits, image_features, text_features, weight, mesh, batch_axes)


def cwcl_softmax_loss(img: jnp.ndarray, txt: jnp.ndarray, image_features: jnp.ndarray,
                      text_features: jnp.ndarray, temperature, weight: float = 1.0, *, mesh=None,
                      batch_axes=("data",)) -> jnp.ndarray:
  """CWCL (Srinivasa et al. 2023, eq. 3) for the softmax loss, both directions, mixed with CLIP.

  With s_ij = <img_i, txt_j> / τ and frozen (encoder-output) features x (image) and y (text):

      w^y_ij = (1 + cos(y_i, y_j)) / 2,   w^x_ij = (1 + cos(x_i, x_j)) / 2
      L_CWCL = ½ [ −(1/B) Σ_i Σ_j (w^y_ij / Σ_j' w^y_ij') log softmax_j(s_i·)       (image → text)
                   −(1/B) Σ_i Σ_j (w^x_ij / Σ_j' w^x_ij') log softmax_j(s_·i) ]     (text → image)

  Each direction's soft targets come from the intra-modal similarity of its *candidates'* frozen
  features: how close text j is to image i's own caption (i→t), image j to text i's own image
  (t→i). (The paper has one frozen modality and uses its similarity in both directions; here both
  towers are frozen.) Since the cross-entropy is linear in the targets, ``weight`` = α gives
  (1 − α) L_CLIP + α L_CWCL (targets (1 − α) one-hot + α w); α = 1 is the paper's loss.
  """
  logits = contrastive.similarities(img, txt) / temperature
  return _loss(logits, image_features, text_features, weight, mesh, batch_axes)
