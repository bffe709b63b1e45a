"""transformers' ``hidden_act`` names as JAX functions (the ones the supported families use)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf, torch.nn.functional.gelu
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """The function for a config's ``hidden_act`` / ``dense_act_fn``; ValueError listing the known."""
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]
