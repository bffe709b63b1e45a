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
  from align_jax.encoders import TEXT_FAMILIES, hub
  folder, _, family = hub.resolve_family(name_or_path, TEXT_FAMILIES, "text", "--text_encoders",
                                         weights=False)
  config = hub.read_config_dict(folder)
  if family.kind == "t5" or "max_position_embeddings" not in config:
    return None
  limit = int(config["max_position_embeddings"])
  if family.padding_positions:
    limit -= int(config.get("pad_token_id") or 0) + 1
  return limit


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
