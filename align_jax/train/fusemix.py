"""FuseMix: mixup of the frozen encoders' outputs before the projectors, ``model.fusemix_alpha``.

Vouitsis et al., "Data-Efficient Multimodal Fusion on a Single GPU", CVPR 2024, Sec. 3.2, eq. 5;
``model.fusemix_alpha`` = 0 is off. An input augmentation, not a loss: the train step
(:mod:`align_jax.train.loop`) mixes the frozen features and the objective
(:mod:`align_jax.objectives.objective`) then sees the mixed pairs only.

Sharding: each device mixes its own rows (``shard_map``: no data moves; a permutation over the
global batch would be an all-to-all of the features every step). With ``k =
data.captions_per_image`` captions, text rows are image-major (text row ``j`` is a caption of
image ``j // k``), so a device's text rows are exactly the captions of its images and they mix
with them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P


def fusemix_draws(key: jax.Array, alpha: float, rows: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(λ ~ Beta(α, α), a permutation of ``rows``) for one device's rows, from ``key``."""
  lam_key, perm_key = jax.random.split(key)
  lam = jax.random.beta(lam_key, alpha, alpha)
  return lam, jax.random.permutation(perm_key, rows)


def mix_rows(features: dict, lam: jnp.ndarray, perm: jnp.ndarray, group: int = 1) -> dict:
  """``x̃ = λ x + (1 − λ) x[perm]`` on every leaf; rows in groups of ``group`` move together."""
  if "mask" in features:
    raise ValueError("model.fusemix_alpha needs pooled features (model.image_pooling / "
                     "text_pooling not 'tokens'): token sequences with masks cannot be mixed")

  def mix(x):
    grouped = x.reshape(perm.shape[0], group, *x.shape[1:])
    mixed = lam * grouped + (1.0 - lam) * grouped[perm]
    return mixed.reshape(x.shape).astype(x.dtype)

  return {name: mix(x) for name, x in features.items()}


def fusemix(key: jax.Array, image: dict, text: dict, alpha: float, *, captions_per_image: int = 1,
            axis_name=None) -> tuple[dict, dict]:
  """FuseMix (Vouitsis et al. 2024, eq. 5): mixup of the frozen encoders' outputs.

      λ ~ Beta(α, α),  π a random permutation of the rows,
      x̃_i = λ x_i + (1 − λ) x_π(i)   and   ỹ_i = λ y_i + (1 − λ) y_π(i)

  with the *same* λ and π for the image features x and the text features y, so the mixed pair
  (x̃_i, ỹ_i) is again a positive pair; the projectors and the contrastive loss then see the mixed
  pairs only (as the paper, which trains on mixed latents). With several captions per image, the
  ``k`` captions of image i are mixed with those of image π(i) (caption c with caption c).

  Under ``shard_map`` (``axis_name`` given) each device mixes its own rows with its own λ and π,
  drawn from ``key`` folded with the device index: mixing stays device-local.
  """
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  rows = jax.tree.leaves(image)[0].shape[0]
  lam, perm = fusemix_draws(key, alpha, rows)
  return mix_rows(image, lam, perm), mix_rows(text, lam, perm, group=captions_per_image)


def make_feature_mixer(config: ml_collections.ConfigDict, mesh) -> Callable:
  """``(rng, step, image, text) -> (image, text)``: FuseMix when ``model.fusemix_alpha`` > 0."""
  alpha = float(config.model.fusemix_alpha)
  if alpha <= 0:
    return lambda rng, step, image, text: (image, text)
  axes = tuple(config.mesh.batch_axes)
  k = int(config.data.captions_per_image)

  def per_device(key, image, text):
    return fusemix(key, image, text, alpha, captions_per_image=k, axis_name=axes)

  def mixer(rng, step, image, text):
    # A stream of its own (not the dropout key): fold the step, then a fixed tag.
    key = jax.random.fold_in(jax.random.fold_in(rng, step), 0x46D)
    specs = (jax.tree.map(lambda _: P(axes), image), jax.tree.map(lambda _: P(axes), text))
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(),) + specs, out_specs=specs)
    return fn(key, image, text)

  return mixer
