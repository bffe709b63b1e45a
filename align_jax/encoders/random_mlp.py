"""The CPU demo's frozen encoders: fixed two-layer networks with random weights, no checkpoint.

``configs/demo.py`` trains projectors between two of them on synthetic vectors, so the whole path
of a batch runs in a minute with nothing downloaded. They are
:class:`align_jax.model.interfaces.FrozenEncoder`s like the Hugging Face ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.model import interfaces


_ACTIVATIONS = {"tanh": jnp.tanh, "gelu": jax.nn.gelu, "sin": jnp.sin, "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class RandomMLPEncoder:
  """A fixed two-layer network with random weights: a stand-in "pretrained" encoder for the demo.

  The weights come from NumPy's PCG64 with ``seed``, so every run, process and machine builds the
  same encoder and it never needs to be checkpointed. Inputs: ``{"values": [B, input_dim]}``.
  """
  input_dim: int
  width: int
  output_dim: int
  seed: int
  activation: str = "tanh"
  name: str = "random_mlp"
  input_kind: str = dataclasses.field(default=interfaces.VECTORS, init=False)

  def __post_init__(self):
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; choose from {sorted(_ACTIVATIONS)}")

  @property
  def params(self) -> dict:
    rng = np.random.default_rng(self.seed)
    w1 = rng.normal(size=(self.input_dim, self.width)) / np.sqrt(self.input_dim)
    w2 = rng.normal(size=(self.width, self.output_dim)) / np.sqrt(self.width)
    return {"w1": w1.astype(np.float32), "b1": rng.normal(size=self.width).astype(np.float32),
            "w2": w2.astype(np.float32), "b2": np.zeros(self.output_dim, np.float32)}

  def apply(self, params: dict, inputs: dict) -> dict:
    hidden = _ACTIVATIONS[self.activation](inputs["values"] @ params["w1"] + params["b1"])
    return {"pooled": hidden @ params["w2"] + params["b2"]}
