"""What the trainer needs of a frozen encoder and of a pair source, as ``typing.Protocol``s.

Frozen encoders (:class:`FrozenEncoder`): the Hugging Face ones (:mod:`align_jax.encoders`), the
stored-features pass-through (:mod:`align_jax.encoders.stored_features`) and the demo's random MLPs
(:mod:`align_jax.encoders.random_mlp`), built by :mod:`align_jax.encoders.factory`. Each holds frozen ``params`` (a pytree the optimiser never sees) and a pure, jit-able
``apply(params, inputs) -> features`` (the features convention of
:mod:`align_jax.model.projectors`). What its inputs are is data, ``input_kind``, not a question of
which methods it happens to have:

* :data:`RAW` — images (PIL, uint8 arrays) or strings; ``preprocess`` turns them into the input
  dict (:class:`RawInputEncoder`: the Hugging Face encoders). Only these can read the image-caption
  pipeline's raw records.
* :data:`VECTORS` — the demo's raw vectors ``{"values": [B, input_dim]}``
  (:class:`VectorInputEncoder`: ``RandomMLPEncoder``).
* :data:`FEATURES` — the inputs are already features (stored encoder outputs); ``apply`` passes
  them through.

Pair sources (:class:`PairSource`): what ``train.Trainer.source`` is, e.g.
``data.features.ArrayPairSource`` (arrays, stored features) and ``data.pipeline.PairSource``
(image-caption records). ``next(source)`` gives this process's rows of the next global batch,
``{"image": {...}, "text": {...}}`` (the encoders' inputs); ``get_state()`` / ``set_state(state)``
a JSON-able dict saved in every checkpoint, so that a resumed run sees exactly the examples an
uninterrupted run would have; ``skipped()`` counters of dropped records by reason
(``{"data/skipped_<reason>": n}``, empty where nothing can be dropped).

The protocols are ``runtime_checkable`` (``isinstance`` checks that the members exist, not their
signatures); tests check every encoder kind and source against them.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

RAW = "raw"
VECTORS = "vectors"
FEATURES = "features"
INPUT_KINDS = (RAW, VECTORS, FEATURES)


@runtime_checkable
class FrozenEncoder(Protocol):
  """A frozen encoder: params and a pure ``apply``; ``input_kind`` says what ``apply`` reads."""

  name: str
  input_kind: str  # one of INPUT_KINDS

  @property
  def params(self) -> Any:
    """The frozen parameter pytree (pass it, or a sharded copy, to ``apply``)."""

  def apply(self, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Features of a batch of inputs; pure, so it runs inside ``jax.jit``."""


@runtime_checkable
class RawInputEncoder(FrozenEncoder, Protocol):
  """A :data:`RAW` encoder: images or strings, with its checkpoint's own preprocessing."""

  def preprocess(self, items: Any) -> dict[str, np.ndarray]:
    """Raw images / strings -> the host arrays ``apply`` takes (as the HF processor/tokenizer)."""

  def encode(self, items: Sequence[Any], batch_size: int = 64) -> np.ndarray:
    """Features of raw items, computed in fixed-size batches."""


@runtime_checkable
class VectorInputEncoder(FrozenEncoder, Protocol):
  """A :data:`VECTORS` encoder: reads ``{"values": float [B, input_dim]}``."""

  input_dim: int


@runtime_checkable
class PairSource(Protocol):
  """Endless, resumable, process-sharded training batches (see the module docstring)."""

  def __iter__(self) -> Iterator[dict[str, Any]]:
    ...

  def __next__(self) -> dict[str, Any]:
    """This process's rows of the next global batch: ``{"image": {...}, "text": {...}}``."""

  def get_state(self) -> dict[str, Any]:
    """The position (JSON-able), saved with every checkpoint."""

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a state ``get_state`` returned (same data, seed and process layout)."""

  def skipped(self) -> dict[str, int]:
    """Dropped records so far, ``{"data/skipped_<reason>": count}``."""

