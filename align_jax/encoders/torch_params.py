"""PyTorch state-dict tensors (flat ``{name: numpy}``) to the nested Flax params of our families.

Host-side numpy only. A family's ``convert`` (bert.py, decoder.py, t5.py) reads its names with
these helpers: :func:`find_prefix` strips whatever wrapper the checkpoint was saved from
(``model.`` of a ``*ForCausalLM``, ``bert.`` of a ``BertForMaskedLM``, ``text_model.`` of CLIP /
SigLIP, ``embedding_model.`` of NV-Embed), :func:`dense` / :func:`layer_norm` /
:func:`embedding` transpose and rename one module, and :func:`stack` stacks per-layer trees on a
new leading axis for the scanned layers.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

Flat = Mapping[str, np.ndarray]


def find_prefix(flat: Flat, anchors: Sequence[str], family: str) -> str:
  """The prefix before the first ``anchors`` name found in ``flat`` (e.g. "model." for "model.norm.weight").

  Raises:
    ValueError: no key ends with any anchor (not a checkpoint of this family).
  """
  for anchor in anchors:
    for name in flat:
      if name == anchor or name.endswith("." + anchor):
        return name[:len(name) - len(anchor)]
  sample = ", ".join(sorted(flat)[:5])
  raise ValueError(f"these weights are not a {family} checkpoint: no tensor named like "
                   f"{anchors[0]!r} (first names: {sample})")


def get(flat: Flat, name: str) -> np.ndarray:
  """``flat[name]`` with a KeyError that names the missing tensor."""
  if name not in flat:
    raise KeyError(f"checkpoint has no tensor {name!r}")
  return np.asarray(flat[name])


def dense(flat: Flat, name: str, bias: bool | None = None) -> dict[str, np.ndarray]:
  """A torch ``nn.Linear`` ``name`` ([out, in] weight) as a Flax Dense ({"kernel": [in, out]}).

  ``bias`` None takes the bias when the checkpoint has one.
  """
  out = {"kernel": get(flat, name + ".weight").T}
  if bias or (bias is None and name + ".bias" in flat):
    out["bias"] = get(flat, name + ".bias")
  return out


def layer_norm(flat: Flat, name: str) -> dict[str, np.ndarray]:
  """A torch LayerNorm as Flax ``nn.LayerNorm`` ({"scale", "bias"})."""
  return {"scale": get(flat, name + ".weight"), "bias": get(flat, name + ".bias")}


def embedding(flat: Flat, name: str) -> dict[str, np.ndarray]:
  """A torch Embedding as Flax ``nn.Embed`` ({"embedding"})."""
  return {"embedding": get(flat, name + ".weight")}


def stack(trees: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per-layer param trees (same structure) stacked leaf-wise on a new axis 0."""
  if not trees:
    raise ValueError("no layers to stack (num_layers_to_run must be >= 1 to stack layers)")
  first = trees[0]
  out = {}
  for key, value in first.items():
    if isinstance(value, Mapping):
      out[key] = stack([t[key] for t in trees])
    else:
      out[key] = np.stack([np.asarray(t[key]) for t in trees])
  return out


def stacked_layers(count: int, one_layer: Callable[[int], Mapping[str, Any]]) -> dict[str, Any]:
  """``stack([one_layer(i) for i in range(count)])``."""
  return stack([one_layer(i) for i in range(count)])


def layers_to_run(num_layers: int, num_layers_to_run: int | None) -> int:
  """Validated count of layers to run: all when None, else 0..num_layers."""
  if num_layers_to_run is None:
    return num_layers
  if not 0 <= int(num_layers_to_run) <= num_layers:
    raise ValueError(f"num_layers_to_run={num_layers_to_run}: this model has {num_layers} layers; "
                     f"pass 0..{num_layers} (or None for all)")
  return int(num_layers_to_run)


def cast(tree: Any, dtype: Any) -> Any:
  """Every floating leaf of a nested dict cast to ``dtype`` (None: unchanged)."""
  if dtype is None:
    return tree
  if isinstance(tree, Mapping):
    return {k: cast(v, dtype) for k, v in tree.items()}
  arr = np.asarray(tree)
  return arr.astype(dtype) if jnp.issubdtype(arr.dtype, jnp.floating) else arr
