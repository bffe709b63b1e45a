"""The seed papers' variants around the projectors, each off by default and switched on from the config.

* **FuseMix** (Vouitsis et al., "Data-Efficient Multimodal Fusion on a Single GPU", CVPR 2024,
  Sec. 3.2, eq. 5): mixup in the frozen latent spaces, ``model.fusemix_alpha`` (0 = off).
  :func:`fusemix`.
* **Several positive captions per image** (SAIL's extra-caption positives for the sigmoid loss;
  multi-positive targets for the softmax loss), ``data.captions_per_image`` (1 = off); every
  source serves k captions per image (align_jax.data.features, align_jax.data.pipeline).
  :func:`multi_positive_softmax_loss`, :func:`multi_positive_sigmoid_loss`.
* **CWCL** (Srinivasa et al., "CWCL: Cross-modal transfer with continuously weighted contrastive
  loss", NeurIPS 2023, eq. 3): soft targets from the frozen features' intra-modal similarity,
  ``loss.cwcl_weight`` (0 = off, 1 = the paper's loss). :func:`cwcl_softmax_loss`.
* **STRUCTURE** (Gröger et al., "With Limited Data for Multimodal Alignment, Let the STRUCTURE
  Guide You", NeurIPS 2025, Sec. 3): a regulariser keeping each unimodal space's neighbourhood
  geometry in the projected space, ``loss.structure_weight`` (0 = off), ``loss.structure_levels``,
  ``loss.structure_temperature``. :func:`structure_regularizer`.

Layout of a batch with ``k = data.captions_per_image`` captions: image rows ``[B, ...]`` and text
rows ``[B * k, ...]``, image-major (text row ``j`` is a caption of image ``j // k``); so a
device's shard of the text rows holds exactly the captions of its shard of the images.

Sharding. FuseMix mixes within each device's rows (``shard_map``: no data moves; a permutation
over the global batch would be an all-to-all of the features every step). The multi-positive and
CWCL losses and the STRUCTURE regulariser are written on the *global* (sharded) arrays inside the
jitted step, the gathered form: XLA all-gathers the other tower and the logits are constrained to
be row-sharded (``[B/n, B*k]`` per device, as ``losses``' ``"gathered"`` impl). STRUCTURE's
``[B, B]`` similarity matrices and their matrix powers are formed whole (replicated); that is
O(B^2) memory per device, fine at the batch sizes the regulariser is used with (its paper: ~10^3;
32k rows cost 4 GiB per [B, B] float32 matrix). The values and gradients equal one device's.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from align_jax.model import ops

_EPS = 1e-12


# --------------------------------------------------------------------------- helpers


def _positive_mask(num_images: int, k: int) -> jnp.ndarray:
  """[B, B*k] bool: text j is a caption of image i iff j // k == i."""
  return jnp.arange(num_images)[:, None] == (jnp.arange(num_images * k) // k)[None, :]


def _row_sharded(x: jnp.ndarray, mesh, batch_axes) -> jnp.ndarray:
  if mesh is None:
    return x
  spec = P(tuple(batch_axes), *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# --------------------------------------------------------------------------- FuseMix


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


# --------------------------------------------------------------------------- softmax targets


def _soft_target_softmax(logits: jnp.ndarray, targets_i2t: jnp.ndarray,
                         targets_t2i: jnp.ndarray) -> jnp.ndarray:
  """0.5 (mean_i CE(targets_i2t[i], softmax(logits[i, :])) + mean_j CE(targets_t2i[j], softmax(logits[:, j])))."""
  i2t = -jnp.sum(targets_i2t * jax.nn.log_softmax(logits, axis=1), axis=1)
  t2i = -jnp.sum(targets_t2i * jax.nn.log_softmax(logits.T, axis=1), axis=1)
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


def multi_positive_softmax_loss(img: jnp.ndarray, txt: jnp.ndarray, temperature, k: int, *,
                                mesh=None, batch_axes=("data",)) -> jnp.ndarray:
  """Softmax (InfoNCE) loss with ``k`` positive captions per image (multi-positive targets).

  With s_ij = <img_i, txt_j> / τ over B images and B·k texts (text j belongs to image j // k):

      L = ½ [ −(1/B) Σ_i Σ_{j: j//k = i} (1/k) log softmax_j(s_i·)
              −(1/(B k)) Σ_j log softmax_i(s_·j)[i = j // k] ]

  image→text targets are uniform over the image's k captions; each caption has one positive
  image. k = 1 is CLIP's loss (``losses.softmax_loss``).
  """
  logits = _row_sharded(img.astype(jnp.float32) @ txt.astype(jnp.float32).T / temperature,
                        mesh, batch_axes)
  positive = _positive_mask(img.shape[0], k).astype(jnp.float32)
  return _soft_target_softmax(logits, positive / k, positive.T)


def multi_positive_sigmoid_loss(img: jnp.ndarray, txt: jnp.ndarray, scale, bias, k: int, *,
                                mesh=None, batch_axes=("data",)) -> jnp.ndarray:
  """SigLIP's loss with every caption of an image labelled +1 (SAIL's extra-caption positives).

      L = −(1/B) Σ_i Σ_j log σ(z_ij (scale <img_i, txt_j> + bias)),  z_ij = +1 if j // k = i else −1

  over B images and B·k texts. k = 1 is ``losses.sigmoid_loss``.
  """
  logits = _row_sharded(scale * (img.astype(jnp.float32) @ txt.astype(jnp.float32).T) + bias,
                        mesh, batch_axes)
  labels = jnp.where(_positive_mask(img.shape[0], k), 1.0, -1.0)
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / img.shape[0]


def cwcl_weights(features: jnp.ndarray) -> jnp.ndarray:
  """CWCL's continuous weights, row-normalised: w_ij = (1 + cos(f_i, f_j)) / 2, then w_ij / Σ_j w_ij."""
  f = ops.l2_normalize(features)
  w = 0.5 * (1.0 + f @ f.T)
  return w / jnp.sum(w, axis=1, keepdims=True)


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
  logits = _row_sharded(img.astype(jnp.float32) @ txt.astype(jnp.float32).T / temperature,
                        mesh, batch_axes)
  eye = jnp.eye(img.shape[0], dtype=jnp.float32)
  w_text = _row_sharded(cwcl_weights(text_features), mesh, batch_axes)
  w_image = _row_sharded(cwcl_weights(image_features), mesh, batch_axes)
  return _soft_target_softmax(logits, (1 - weight) * eye + weight * w_text,
                              (1 - weight) * eye + weight * w_image)


# --------------------------------------------------------------------------- STRUCTURE


def _structure_matrix(x: jnp.ndarray, temperature: float) -> jnp.ndarray:
  """softmax_rows(X̂ X̂ᵀ / τ) with X̂ the L2-normalised rows, mean-centred over the batch."""
  x = ops.l2_normalize(x)
  x = x - jnp.mean(x, axis=0, keepdims=True)
  return jax.nn.softmax(x @ x.T / temperature, axis=1)


def _js_rows(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
  """Mean over rows of the Jensen-Shannon divergence between row distributions p_i and q_i."""
  m = 0.5 * (p + q)
  kl_pm = jnp.sum(p * (jnp.log(p + _EPS) - jnp.log(m + _EPS)), axis=1)
  kl_qm = jnp.sum(q * (jnp.log(q + _EPS) - jnp.log(m + _EPS)), axis=1)
  return jnp.mean(0.5 * (kl_pm + kl_qm))


def structure_regularizer(frozen: jnp.ndarray, projected: jnp.ndarray, levels: int = 1,
                          temperature: float = 0.07) -> jnp.ndarray:
  """STRUCTURE (Gröger et al. 2025, Sec. 3) for one modality: frozen X [B, d], projected Z [B, D].

      X̂ = normalise(X) − mean_rows(normalise(X)),   P = softmax_rows(X̂ X̂ᵀ / τ)   (same for Z → Q)
      R(X, Z) = (1/L) Σ_{l=1..L} (1/B) Σ_i JS(P^l_i ‖ Q^l_i)
      JS(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),  m = ½ (p + q)

  P^l is the l-th matrix power of the row-stochastic P: the l-step random-walk neighbourhoods,
  the paper's hierarchy levels (levels weighted equally; logs take +1e-12 as the authors' code).
  The training objective adds ``weight · ½ (R(x, z_image) + R(y, z_text))``; X is fixed (frozen
  features), gradients flow through Z only.
  """
  p_base = jax.lax.stop_gradient(_structure_matrix(frozen, temperature))
  q_base = _structure_matrix(projected, temperature)
  p, q, total = p_base, q_base, 0.0
  for level in range(1, levels + 1):
    if level > 1:
      p, q = p @ p_base, q @ q_base
    total = total + _js_rows(p, q)
  return total / levels


# --------------------------------------------------------------------------- the objective


def make_objective(config: ml_collections.ConfigDict, mesh, kind) -> Callable:
  """``(z_image, z_text, loss args, image features, text features) -> (loss, extra metrics)``.

  ``kind`` is the run's loss kind (``align_jax.objectives.kinds.get(config.loss)``): its sharded
  loss (``losses``) is used unless several captions per image (its multi-positive loss) or CWCL
  replace it. STRUCTURE is added on top of either.
  """
  loss_config, axes = config.loss, tuple(config.mesh.batch_axes)
  k = int(config.data.captions_per_image)
  kw = dict(mesh=mesh, batch_axes=axes)
  base_loss_fn = kind.sharded_loss(mesh, axes)

  def contrastive(zi, zt, values, image, text):
    if loss_config.cwcl_weight > 0:  # softmax only (config.validate)
      return cwcl_softmax_loss(zi, zt, ops.pooled(image, jnp.float32), ops.pooled(text, jnp.float32), values["temperature"],
                               loss_config.cwcl_weight, **kw)
    if k > 1:
      return kind.multi_positive_loss(zi, zt, values, k, **kw)
    return base_loss_fn(zi, zt, values)

  def objective(zi, zt, values, image, text):
    loss = contrastive(zi, zt, values, image, text)
    if loss_config.structure_weight <= 0:
      return loss, {}
    levels, tau = int(loss_config.structure_levels), float(loss_config.structure_temperature)
    reg = 0.5 * (structure_regularizer(ops.pooled(image, jnp.float32), zi, levels, tau)
                 + structure_regularizer(ops.pooled(text, jnp.float32), zt, levels, tau))
    return loss + loss_config.structure_weight * reg, {"structure": reg}

  return objective

