"""The contrastive loss with several positive captions per image, ``data.captions_per_image`` = k.

SAIL's extra-caption positives for the sigmoid loss; multi-positive targets for the softmax loss.
Every source serves k captions per image (align_jax.data.array_sources, align_jax.data.pipeline), laid
out image-major: image rows ``[B, ...]`` and text rows ``[B * k, ...]``, text row ``j`` a caption
of image ``j // k``; so a device's shard of the text rows holds exactly the captions of its shard
of the images. k = 1 is the plain loss.

:func:`multi_positive_loss` takes the run's loss kind (:mod:`align_jax.objectives.kinds`) and
scores the kind's logits (``kind.logits``) with the form its name selects (``FORMS``);
:func:`multi_positive_softmax_loss` and :func:`multi_positive_sigmoid_loss` are the two forms
with their logit scalars given. The loss is written on the global (sharded) arrays inside the
jitted step, the gathered form of :mod:`align_jax.objectives.contrastive`: the logits are
row-sharded (``[B/n, B*k]`` per device), and the values and gradients equal one device's.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from align_jax.objectives import contrastive
from align_jax.objectives.kinds import LossKind


def positive_mask(num_images: int, k: int) -> jnp.ndarray:
  """[B, B*k] bool: text j is a caption of image i iff j // k == i."""
  return jnp.arange(num_images)[:, None] == (jnp.arange(num_images * k) // k)[None, :]


def softmax_form(logits: jnp.ndarray, k: int) -> jnp.ndarray:
  """Cross-entropy of [B, B*k] logits, image→text targets uniform over the image's k captions,
  text→image targets one-hot on the caption's image (:func:`multi_positive_softmax_loss`)."""
  positive = positive_mask(logits.shape[0], k).astype(jnp.float32)
  return contrastive.soft_target_softmax_loss(logits, positive / k, positive.T)


def sigmoid_form(logits: jnp.ndarray, k: int) -> jnp.ndarray:
  """−(1/B) Σ log σ(z_ij logits_ij) of [B, B*k] logits, z = +1 on every caption of an image,
  −1 elsewhere (:func:`multi_positive_sigmoid_loss`)."""
  labels = jnp.where(positive_mask(logits.shape[0], k), 1.0, -1.0)
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


# loss kind name -> how its logits are scored with k positives (a test checks every kind has one)
FORMS: dict[str, Callable[[jnp.ndarray, int], jnp.ndarray]] = {
    "softmax": softmax_form, "sigmoid": sigmoid_form}


def _logits(similarity_to_logits, img, txt, mesh, batch_axes):
  return contrastive.row_sharded(similarity_to_logits(contrastive.similarities(img, txt)), mesh,
                                 batch_axes)


def multi_positive_loss(kind: LossKind, img: jnp.ndarray, txt: jnp.ndarray,
                        args: Mapping[str, Any], k: int, *, mesh=None,
                        batch_axes=("data",)) -> jnp.ndarray:
  """The loss of ``kind`` with ``k`` captions per image, all positives.

  ``img`` [B, D] and ``txt`` [B*k, D] unit rows; ``args``: ``kind.loss_args`` of the logit params.
  """
  if kind.name not in FORMS:
    raise ValueError(f"loss {kind.name!r} has no multi-positive form: set "
                     f"data.captions_per_image=1 or loss.name to one of "
                     f"{', '.join(repr(n) for n in FORMS)}")
  logits = _logits(lambda s: kind.logits(s, args), img, txt, mesh, batch_axes)
  return FORMS[kind.name](logits, k)


def multi_positive_softmax_loss(img: jnp.ndarray, txt: jnp.ndarray, temperature, k: int, *,
                                mesh=None, batch_axes=("data",)) -> jnp.ndarray:
  """Softmax (InfoNCE) loss with ``k`` positive captions per image (multi-positive targets).

  With s_ij = <img_i, txt_j> / τ over B images and B·k texts (text j belongs to image j // k):

      L = ½ [ −(1/B) Σ_i Σ_{j: j//k = i} (1/k) log softmax_j(s_i·)
              −(1/(B k)) Σ_j log softmax_i(s_·j)[i = j // k] ]

  image→text targets are uniform over the image's k captions; each caption has one positive
  image. k = 1 is CLIP's loss (``contrastive.softmax_loss``).
  """
  return softmax_form(_logits(lambda s: s / temperature, img, txt, mesh, batch_axes), k)


def multi_positive_sigmoid_loss(img: jnp.ndarray, txt: jnp.ndarray, scale, bias, k: int, *,
                                mesh=None, batch_axes=("data",)) -> jnp.ndarray:
  """SigLIP's loss with every caption of an image labelled +1 (SAIL's extra-caption positives).

      L = −(1/B) Σ_i Σ_j log σ(z_ij (scale <img_i, txt_j> + bias)),  z_ij = +1 if j // k = i else −1

  over B images and B·k texts. k = 1 is ``contrastive.sigmoid_loss``.
  """
  return sigmoid_form(_logits(lambda s: scale * s + bias, img, txt, mesh, batch_axes), k)
