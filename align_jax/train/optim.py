"""The optax chain for the trainable params: clipping, AdamW, warm-up + cosine schedule.

Defaults are freeze-align's (RECIPES §1): AdamW lr 1e-3, weight decay 0.02, linear warm-up then
cosine decay to 1e-5. Weight decay applies to matrices only: biases, norm scales and the logit
params (temperature, scale, bias) are not decayed.
"""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to ``optim.learning_rate``, cosine decay to ``optim.end_learning_rate``."""
  opt = config.optim
  warmup = min(opt.warmup_steps, config.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=opt.end_learning_rate)


def weight_decay_mask(params) -> dict:
  """True for parameters that get weight decay: >= 2-D arrays outside the logit params."""
  def decays(path, leaf):
    top = getattr(path[0], "key", None)
    return top != "logit" and getattr(leaf, "ndim", 0) >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optim
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(config), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts)
