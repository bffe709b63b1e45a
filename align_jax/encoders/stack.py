"""The families' stacked blocks: how many to run, and the ``nn.scan`` that runs them.

Every text family keeps its blocks' params stacked on a leading axis and runs them with one
``nn.scan`` (compile time flat in depth). ``num_layers_to_run=k`` scans only the first k blocks
(aligning hidden layer k computes nothing above it) and loads only their weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def text_param_shapes(module: nn.Module) -> dict[str, Any]:
  """A text module's float32 param shapes (``jax.ShapeDtypeStruct``s), traced on a dummy
  ``(input_ids, attention_mask)`` of shape [1, 2]: nothing is computed or allocated."""
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  return jax.eval_shape(module.init, jax.random.key(0), ids, ids)["params"]
