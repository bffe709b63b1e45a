"""Tokens per text for the analysis commands: 77 (CLIP's length) or the encoder's limit if smaller.

``align-jax select`` and ``curate`` take ``--max_text_length``. Left out, each text encoder gets
``min(77, its position table)``, so a small encoder such as the online demo's tiny BERT (64
positions) works as given; a value above an encoder's limit stops with one line naming the limit.
The limit is read from the checkpoint's ``config.json`` alone, as
:meth:`align_jax.encoders.TextEncoder.from_pretrained` counts it (encoders whose position ids start
after the padding id, e.g. RoBERTa, lose ``pad_token_id + 1`` positions; T5 has no table).
"""

from __future__ import annotations

DEFAULT_LENGTH = 77


def encoder_limit(name_or_path: str) -> int | None:
  """The most tokens per text ``name_or_path`` can take; None when it has no position table."""
  from align_jax.encoders import hub, text, weights
  folder = hub.resolve_checkpoint(name_or_path, "--text_encoders", weights=False)
  return text.position_limit(weights.read_config(folder), str(name_or_path))


def choose(name_or_path: str, requested: int | None, flag: str = "--max_text_length") -> int:
  """``requested`` if the encoder can take it, else ValueError in one line; None/0: the default."""
  limit = encoder_limit(name_or_path)
  if not requested:
    return DEFAULT_LENGTH if limit is None else min(DEFAULT_LENGTH, limit)
  if requested < 1 or (limit is not None and requested > limit):
    raise ValueError(f"{flag}={requested} does not fit text encoder {name_or_path}: it takes "
                     f"1 to {limit} tokens (its position table); use {flag}={limit} or less, or "
                     "leave the flag out (77, or the encoder's limit when smaller)")
  return requested
