"""The training objective: the run's loss kind and the papers' loss variants, composed from config.

``make_objective(config, mesh, kind)`` picks, once per run, the contrastive loss:

* CWCL (:mod:`align_jax.objectives.cwcl`) when ``loss.cwcl_weight`` > 0;
* else the loss with several positives per image (:mod:`align_jax.objectives.multi_positive`)
  when ``data.captions_per_image`` > 1;
* else the kind's own sharded loss (:mod:`align_jax.objectives.kinds`,
  :mod:`align_jax.objectives.contrastive`);

and adds the STRUCTURE regulariser (:mod:`align_jax.objectives.structure`) when
``loss.structure_weight`` > 0. Every variant is off by default. The input augmentation FuseMix
is not part of the objective: it mixes the frozen features before the projectors
(:mod:`align_jax.train.fusemix`).

Imports in this package go one way: contrastive <- kinds <- multi_positive, cwcl, structure <-
objective (a test checks).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import ml_collections

from align_jax.model import ops
from align_jax.objectives import cwcl, multi_positive, structure
from align_jax.objectives.kinds import LossKind


def make_objective(config: ml_collections.ConfigDict, mesh, kind: LossKind) -> Callable:
  """``(z_image, z_text, loss args, image features, text features) -> (loss, extra metrics)``.

  ``kind`` is the run's loss kind (``align_jax.objectives.kinds.get(config.loss)``) and the loss
  args its ``loss_args``; the features are the frozen encoders' outputs (CWCL's targets and
  STRUCTURE's reference geometry). The extra metrics hold ``structure`` when it is on.
  """
  loss_config, axes = config.loss, tuple(config.mesh.batch_axes)
  k = int(config.data.captions_per_image)
  kw = dict(mesh=mesh, batch_axes=axes)
  base_loss_fn = kind.sharded_loss(mesh, axes)

  def contrastive(zi, zt, values, image, text):
    if loss_config.cwcl_weight > 0:  # softmax only (config.validate)
      return cwcl.cwcl_loss(kind, zi, zt, values, ops.pooled(image, jnp.float32),
                            ops.pooled(text, jnp.float32), loss_config.cwcl_weight, **kw)
    if k > 1:
      return multi_positive.multi_positive_loss(kind, zi, zt, values, k, **kw)
    return base_loss_fn(zi, zt, values)

  def objective(zi, zt, values, image, text):
    loss = contrastive(zi, zt, values, image, text)
    if loss_config.structure_weight <= 0:
      return loss, {}
    levels, tau = int(loss_config.structure_levels), float(loss_config.structure_temperature)
    reg = 0.5 * (structure.structure_regularizer(ops.pooled(image, jnp.float32), zi, levels, tau)
                 + structure.structure_regularizer(ops.pooled(text, jnp.float32), zt, levels, tau))
    return loss + loss_config.structure_weight * reg, {"structure": reg}

  return objective
