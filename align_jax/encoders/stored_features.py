"""Stored features as a frozen encoder: the batch already holds an encoder's outputs.

Training on a feature store (``data.source=features``, ``model.*_encoder=features``) runs no encoder
in the step; this pass-through keeps the :class:`align_jax.model.interfaces.FrozenEncoder` shape
(``params``, a pure ``apply``) so the model treats it like any other frozen encoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from align_jax.model import interfaces


@dataclasses.dataclass(frozen=True)
class StoredFeatures:
  """The batch already holds encoder outputs (``{"pooled": ...}`` or ``{"tokens", "mask"}``)."""
  name: str = "features"
  input_kind: str = dataclasses.field(default=interfaces.FEATURES, init=False)

  @property
  def params(self) -> dict:
    return {}

  def apply(self, params: Any, inputs: dict) -> dict:
    del params
    return dict(inputs)
