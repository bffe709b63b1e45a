"""The families' stacked blocks: how many to run, and the ``nn.scan`` that runs them.

Every text family keeps its blocks' params stacked on a leading axis and runs them with one
``nn.scan`` (compile time flat in depth). ``num_layers_to_run=k`` scans only the first k blocks
(aligning hidden layer k computes nothing above it) and loads only their weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn


def layers_to_run(num_layers: int, num_layers_to_run: int | None) -> int:
  """Validated count of blocks to run: all when None, else 0..num_layers."""
  if num_layers_to_run is None:
    return num_layers
  if not 0 <= int(num_layers_to_run) <= num_layers:
    raise ValueError(f"num_layers_to_run={num_layers_to_run}: this model has {num_layers} layers; "
                     f"pass 0..{num_layers} (or None for all)")
  return int(num_layers_to_run)


def scanned(block: type[nn.Module], count: int, broadcast_args: int) -> Any:
  """``block`` scanned ``count`` times over stacked params; its ``__call__(carry, *args)``
  takes ``broadcast_args`` arguments shared by every step and returns ``(carry, per-step y)``."""
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(nn.broadcast,) * broadcast_args, length=count)
