"""The objective's config checks (:mod:`align_jax.config.checks`): the loss name (from the loss
kinds' registry), its temperature range, and how CWCL, STRUCTURE, multi-positive captions and
FuseMix combine."""

from __future__ import annotations

import ml_collections

from align_jax.config import checks
from align_jax.objectives import kinds

checks.register_choices(__name__, "loss.name", kinds.NAMES, what="loss")


@checks.register
def check_objective(config: ml_collections.ConfigDict, context: checks.Context) -> list[str]:
  del context  # the objective's keys do not depend on the mesh
  problems = []
  m, d, l = config.model, config.data, config.loss
  if not 0 < l.temperature_min <= l.temperature_init <= l.temperature_max:
    problems.append("need 0 < loss.temperature_min <= loss.temperature_init <= "
                    "loss.temperature_max")
  if m.fusemix_alpha < 0:
    problems.append(f"model.fusemix_alpha must be >= 0 (0 = off; got {m.fusemix_alpha})")
  if m.fusemix_alpha > 0 and "tokens" in (m.image_pooling, m.text_pooling):
    problems.append("model.fusemix_alpha needs pooled features: set model.image_pooling / "
                    "model.text_pooling to cls or mean (not tokens), or model.fusemix_alpha=0")
  if not 0 <= l.cwcl_weight <= 1:
    problems.append(f"loss.cwcl_weight must be in [0, 1] (0 = off, 1 = CWCL; got {l.cwcl_weight})")
  if l.cwcl_weight > 0 and l.name != "softmax":
    problems.append("loss.cwcl_weight is for the softmax loss: set loss.name=softmax or "
                    "loss.cwcl_weight=0")
  if l.cwcl_weight > 0 and d.captions_per_image > 1:
    problems.append("loss.cwcl_weight and data.captions_per_image > 1 cannot be combined: "
                    "set one of them off")
  if (d.captions_per_image > 1 or l.cwcl_weight > 0) and l.impl == "blockwise":
    problems.append("data.captions_per_image > 1 and loss.cwcl_weight use a gathered loss: set "
                    "loss.impl=gathered (or leave it empty)")
  if l.structure_weight < 0:
    problems.append(f"loss.structure_weight must be >= 0 (0 = off; got {l.structure_weight})")
  if l.structure_levels < 1 or l.structure_temperature <= 0:
    problems.append("loss.structure_levels must be >= 1 and loss.structure_temperature > 0")
  return problems
