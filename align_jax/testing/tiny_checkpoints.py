"""Tiny random Hugging Face checkpoints written to a folder: for tests and the online CPU demo.

Nothing here touches the hub; the online demo (configs/demo_online.py) builds its encoders with it.

Each ``make_tiny_*`` function writes a complete checkpoint folder (``config.json``, weights, and the
image processor or tokenizer a real checkpoint ships with) and returns its path, so the folder can be
passed to ``ImageEncoder.from_pretrained`` / ``TextEncoder.from_pretrained`` or to transformers.

``save_format="flax"`` fills align_jax's own Flax module's parameter tree with seeded random numbers
and writes it under the PyTorch names (the reverse name table) as ``model.safetensors``, with the
transformers config class's ``config.json``: no torch and no transformers model class are needed
(the online demo's path). ``save_format="pt"`` initialises the PyTorch model with a fixed seed and
writes ``model.safetensors`` (needs torch); this is how most hub checkpoints ship. Either folder
loads in transformers' PyTorch model (the tests' reference).

The tokenizers are trained on a small built-in corpus with the ``tokenizers`` library, so they are
real WordPiece / byte-level BPE / SentencePiece-style (Metaspace BPE, Unigram) tokenizers with a
small vocabulary (a few hundred entries).

The decoder LLMs (Llama, Mistral, Gemma) use grouped-query attention (4 query heads, 2 key/value
heads) and a larger initialiser scale (``initializer_range`` 0.2) than the real models, so their
attention is far from uniform and position or padding mistakes show in the outputs.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np
import transformers

from align_jax.encoders import weights

# Sentences the tiny tokenizers are trained on; tests may tokenize anything (unknown pieces fall
# back to characters, bytes or [UNK]).
CORPUS = (
  "a photo of a cat sitting on a mat",
  "a dog runs across the green field",
  "that is a happy person",
  "that is a very happy dog",
  "today is a sunny day in the city",
  "two people ride bicycles along the river",
  "the quick brown fox jumps over the lazy dog",
  "an aerial view of mountains covered in snow",
)

# Small transformer sizes shared by every family (odd intermediate size on purpose).
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SAVE_FORMATS = ("flax", "pt")


def _save_model(path: str, config: Any, torch_cls_name: str, save_format: str, seed: int,
                flax_std: float = 0.02) -> None:
  """Initialises a model of ``config`` with ``seed`` and saves it to ``path`` in ``save_format``."""
  if save_format not in _SAVE_FORMATS:
    raise ValueError(f"save_format must be one of {_SAVE_FORMATS}, got {save_format!r}")
  os.makedirs(path, exist_ok=True)
  if save_format == "pt":
    import torch  # Only this branch needs torch.
    torch.manual_seed(seed)
    model = getattr(transformers, torch_cls_name)(config).eval()
    model.save_pretrained(path, safe_serialization=True)
  else:
    write_random_weights(path, config, seed, flax_std)


def write_random_weights(path: str, config: Any, seed: int, std: float = 0.02) -> None:
  """Writes ``config`` (a transformers config) and seeded random weights for it to ``path``, as
  ``model.safetensors`` under PyTorch names (:func:`random_state_dict`); no torch needed."""
  weights.write_safetensors(random_state_dict(config.to_dict(), seed, std),
                            os.path.join(path, weights.SINGLE))
  config.save_pretrained(path)


def random_state_dict(config: dict[str, Any], seed: int, std: float = 0.02
                      ) -> dict[str, np.ndarray]:
  """Seeded random weights of align_jax's module(s) for ``config``, under PyTorch names.

  The module's param shapes come from an abstract trace (nothing is compiled); norm scales
  ("scale", "weight") are 1 + N(0, 0.1^2), everything else N(0, std^2), float32. The reverse name
  tables (:func:`align_jax.encoders.weights.from_flax`) give the names the PyTorch model saves, so
  transformers loads the result. A two-tower CLIP / SigLIP config gets both towers.
  """
  from align_jax.encoders import nvembed, text, vit
  model_type = config["model_type"]
  rng = np.random.default_rng(seed)

  def fill(tree: Any) -> Any:
    def leaf(path: tuple[Any, ...], x: Any) -> np.ndarray:
      values = rng.normal(size=x.shape).astype(np.float32)
      name = str(getattr(path[-1], "key", path[-1]))
      return 1.0 + 0.1 * values if name in ("scale", "weight") else np.float32(std) * values
    return jax.tree_util.tree_map_with_path(leaf, tree)

  state: dict[str, np.ndarray] = {}
  if model_type in vit.FAMILIES:
    cfg = vit.read_config(config)
    params = fill(vit.abstract_params(cfg, cfg.image_size // cfg.patch_size))
    prefix = "vision_model." if model_type in ("clip", "siglip", "clip_vision_model",
                                               "siglip_vision_model") else ""
    state.update(weights.from_flax(params, vit.rules(cfg), cfg.num_layers, prefix))
  if model_type in nvembed.MODEL_TYPES:
    cfg = nvembed.read_config(config)
    state.update(nvembed.state_dict(fill(nvembed.abstract_params(cfg)), cfg))
  elif model_type in text.TEXT_FAMILIES:
    family = text.TEXT_FAMILIES[model_type]
    cfg = family.read_config(config)
    params = fill(family.abstract_params(cfg))
    prefix = "text_model." if model_type in ("clip", "siglip") else ""
    state.update(weights.from_flax(params, family.rules(cfg), cfg.num_layers, prefix))
  if not state:
    raise ValueError(f"no align_jax module for model_type {model_type!r}")
  return state


def _vocab_files(cls: Any, vocab_file: str, merges_file: str | None = None) -> dict[str, str]:
  """The vocabulary-file arguments of a tokenizer class: ``vocab`` / ``merges`` in transformers 5,
  ``vocab_file`` / ``merges_file`` in 4.x (5.x ignores those names silently)."""
  import inspect
  new = "vocab" in inspect.signature(cls.__init__).parameters
  out = {"vocab" if new else "vocab_file": vocab_file}
  if merges_file is not None:
    out["merges" if new else "merges_file"] = merges_file
  return out


def _wordpiece_tokenizer(path: str, corpus=CORPUS) -> transformers.PreTrainedTokenizerFast:
  """A lower-casing BERT WordPiece tokenizer trained on ``corpus``, saved to ``path``."""
  import tokenizers
  trainer = tokenizers.BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(list(corpus), vocab_size=200, min_frequency=1)
  with tempfile.TemporaryDirectory() as tmp:
    vocab_file = trainer.save_model(tmp)[0]
    tok = transformers.BertTokenizerFast(**_vocab_files(transformers.BertTokenizerFast, vocab_file),
                                         do_lower_case=True)
    tok.save_pretrained(path)
  return tok


def _byte_bpe_files(tmp: str) -> tuple[str, str]:
  """Trains a RoBERTa-style byte-level BPE on CORPUS in ``tmp``; returns (vocab.json, merges.txt)."""
  import tokenizers
  trainer = tokenizers.ByteLevelBPETokenizer()
  trainer.train_from_iterator(list(CORPUS), vocab_size=300, min_frequency=1,
                              special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
  vocab_file, merges_file = trainer.save_model(tmp)
  return vocab_file, merges_file


def _byte_characters() -> dict[int, str]:
  """GPT-2 / CLIP byte-level BPE's byte -> printable character table.

  Printable Latin-1 bytes stand for themselves; the other 68 bytes map, in byte order, to the
  code points 256, 257, ... so every byte has a visible, non-space character.
  """
  printable = (set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
               | set(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(256 + extra)
      extra += 1
  return table


def _clip_bpe_files(tmp: str) -> tuple[str, str]:
  """Writes a CLIP-style BPE vocabulary (bytes, bytes + "</w>", whole corpus words) in ``tmp``.

  CLIP's vocabulary holds every byte character with and without the end-of-word suffix, then one
  entry per merge, then the two special tokens. The merges here spell out each corpus word left to
  right, so corpus words become single tokens and other words fall back to characters.
  """
  import json
  chars = list(_byte_characters().values())
  vocab = chars + [c + "</w>" for c in chars]
  merges: list[str] = []
  for word in sorted({w for line in CORPUS for w in line.split()}):
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merged = pieces[0]
    for piece in pieces[1:]:
      rule = f"{merged} {piece}"
      merged += piece
      if rule not in merges:
        merges.append(rule)
        vocab.append(merged)
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
  with open(vocab_file, "w", encoding="utf-8") as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f)
  with open(merges_file, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return vocab_file, merges_file


def save_roberta_tokenizer(path: str) -> transformers.PreTrainedTokenizerFast:
  """A small RoBERTa byte-level BPE tokenizer (<s>=0, <pad>=1, </s>=2) saved to ``path``.

  Its special ids are RoBERTa's, so it also serves a full-size RoBERTa config (config-only folders
  for ahead-of-time compiles, where only the ids' shapes matter).
  """
  with tempfile.TemporaryDirectory() as tmp:
    vocab_file, merges_file = _byte_bpe_files(tmp)
    tok = transformers.RobertaTokenizerFast(
      **_vocab_files(transformers.RobertaTokenizerFast, vocab_file, merges_file))
    tok.save_pretrained(path)
  return tok


def make_tiny_bert(path: str, save_format: str = "pt", seed: int = 0,
                   max_position_embeddings: int = 64, corpus=CORPUS) -> str:
  """Writes a tiny random BERT checkpoint with a WordPiece tokenizer trained on ``corpus``."""
  tok = _wordpiece_tokenizer(path, corpus)
  config = transformers.BertConfig(vocab_size=len(tok), type_vocab_size=2,
                                   max_position_embeddings=max_position_embeddings,
                                   pad_token_id=tok.pad_token_id, **_TINY)
  _save_model(path, config, "BertModel", save_format, seed)
  return path


def make_tiny_roberta(path: str, save_format: str = "pt", seed: int = 0,
                      max_position_embeddings: int = 66, xlm: bool = False) -> str:
  """Writes a tiny random RoBERTa (or, with ``xlm=True``, XLM-RoBERTa) checkpoint; returns ``path``.

  Both use the byte-level BPE tokenizer: the encoder only depends on the ids, and the special ids
  (<s>=0, <pad>=1, </s>=2) are those of both families. Position ids start after the pad id, as in
  the real models, so ``max_position_embeddings`` is the usable length plus 2.
  """
  tok = save_roberta_tokenizer(path)
  cls_name = "XLMRobertaConfig" if xlm else "RobertaConfig"
  config = getattr(transformers, cls_name)(
    vocab_size=len(tok), type_vocab_size=1, max_position_embeddings=max_position_embeddings,
    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    **_TINY)
  prefix = "XLMRoberta" if xlm else "Roberta"
  _save_model(path, config, f"{prefix}Model", save_format, seed)
  return path


def make_tiny_xlm_roberta(path: str, save_format: str = "pt", seed: int = 0) -> str:
  """Writes a tiny random XLM-RoBERTa checkpoint (see ``make_tiny_roberta``); returns ``path``."""
  return make_tiny_roberta(path, save_format=save_format, seed=seed, xlm=True)


def make_tiny_dinov2(path: str, image_size: int = 28, patch_size: int = 4,
                     save_format: str = "pt", seed: int = 0) -> str:
  """Writes a tiny random DINOv2 checkpoint with a DINOv2-style image processor; returns ``path``.

  Like the real checkpoints, the processor resizes the short side to ``8/7 * image_size`` (256 for
  224) with bicubic resampling, centre-crops ``image_size`` and normalises with ImageNet mean/std.
  """
  config = transformers.Dinov2Config(image_size=image_size, patch_size=patch_size, mlp_ratio=2,
                                     hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     layerscale_value=0.5)
  _save_model(path, config, "Dinov2Model", save_format, seed)
  transformers.BitImageProcessor(
    size={"shortest_edge": round(image_size * 8 / 7)}, crop_size=image_size, resample=3,
    image_mean=list(_IMAGENET_MEAN), image_std=list(_IMAGENET_STD)).save_pretrained(path)
  return path


def make_tiny_vit(path: str, image_size: int = 24, patch_size: int = 6,
                  save_format: str = "pt", seed: int = 0) -> str:
  """Writes a tiny random ViT checkpoint with a ViT image processor (square bilinear resize)."""
  config = transformers.ViTConfig(image_size=image_size, patch_size=patch_size, **_TINY)
  _save_model(path, config, "ViTModel", save_format, seed)
  transformers.ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(
    path)
  return path


def make_tiny_clip(path: str, image_size: int = 24, patch_size: int = 6, save_format: str = "pt",
                   seed: int = 0, max_position_embeddings: int = 32) -> str:
  """Writes a tiny random full CLIP checkpoint (both towers), tokenizer and image processor.

  The text tower's ``eos_token_id`` is the tokenizer's real <|endoftext|> id (not the legacy 2), so
  the EOS token is found by id, as in current CLIP checkpoints.
  """
  with tempfile.TemporaryDirectory() as tmp:
    vocab_file, merges_file = _clip_bpe_files(tmp)
    tok = transformers.CLIPTokenizerFast(
      **_vocab_files(transformers.CLIPTokenizerFast, vocab_file, merges_file))
    tok.save_pretrained(path)
  text = dict(vocab_size=len(tok), max_position_embeddings=max_position_embeddings,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, **_TINY)
  vision = dict(image_size=image_size, patch_size=patch_size, **_TINY)
  config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
  _save_model(path, config, "CLIPModel", save_format, seed)
  transformers.CLIPImageProcessor(
    size={"shortest_edge": image_size}, crop_size=image_size, image_mean=list(_CLIP_MEAN),
    image_std=list(_CLIP_STD)).save_pretrained(path)
  return path


def _metaspace_tokenizer(specials: list[str], unk: str, corpus=CORPUS, unigram: bool = False):
  """A SentencePiece-style tokenizer (Metaspace "▁" word starts; BPE, or Unigram for T5)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  alphabet = sorted({c for line in corpus for c in line.replace(" ", "▁")} | {"▁"})
  if unigram:
    tok = tokenizers.Tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=specials, unk_token=unk,
                                      initial_alphabet=alphabet)
  else:
    tok = tokenizers.Tokenizer(models.BPE(unk_token=unk))
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=specials,
                                  initial_alphabet=alphabet)
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  tok.train_from_iterator(list(corpus), trainer)
  return tok


# model_type -> (transformers class prefix, special tokens in id order, bos, eos, unk, pad)
_DECODERS = {
  "llama": ("Llama", ["<unk>", "<s>", "</s>"], "<s>", "</s>", "<unk>", None),
  "mistral": ("Mistral", ["<unk>", "<s>", "</s>"], "<s>", "</s>", "<unk>", None),
  "gemma": ("Gemma", ["<pad>", "<eos>", "<bos>", "<unk>"], "<bos>", "<eos>", "<unk>", "<pad>"),
}


def make_tiny_decoder(path: str, model_type: str = "llama", save_format: str = "pt",
                      seed: int = 0, max_position_embeddings: int = 64, add_eos: bool = True,
                      padding_side: str = "left", corpus=CORPUS, **config_overrides) -> str:
  """Writes a tiny random Llama, Mistral or Gemma checkpoint with its tokenizer; returns ``path``.

  The tokenizer adds BOS and, with ``add_eos`` (as E5-Mistral's), EOS; like the real Llama /
  Mistral tokenizers those two have no pad token (the encoder pads with EOS), Gemma's has one.
  ``padding_side`` is the tokenizer's default side (Llama and Gemma tokenizers pad on the left).
  ``config_overrides`` go to the config (e.g. ``sliding_window=4``, ``rope_theta=...``).
  """
  prefix, specials, bos, eos, unk, pad = _DECODERS[model_type]
  tok_cls = getattr(transformers, f"{'Gemma' if model_type == 'gemma' else 'Llama'}TokenizerFast")
  extra = {} if model_type == "gemma" else {"legacy": False}
  tok = tok_cls(tokenizer_object=_metaspace_tokenizer(specials, unk, corpus), bos_token=bos,
                eos_token=eos, unk_token=unk, pad_token=pad, add_bos_token=True,
                add_eos_token=add_eos, padding_side=padding_side, **extra)
  tok.save_pretrained(path)
  ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
         "pad_token_id": tok.pad_token_id}
  sizes = dict(_TINY, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
               initializer_range=0.2)
  if model_type == "gemma":
    sizes.update(head_dim=8, hidden_act="gelu_pytorch_tanh", hidden_activation=None)
  config = getattr(transformers, f"{prefix}Config")(vocab_size=len(tok), **ids,
                                                    **{**sizes, **config_overrides})
  _save_model(path, config, f"{prefix}Model", save_format, seed,
              flax_std=0.2)
  return path


def make_tiny_llama(path: str, save_format: str = "pt", seed: int = 0, **kwargs) -> str:
  """Writes a tiny random Llama checkpoint (see ``make_tiny_decoder``); returns ``path``."""
  return make_tiny_decoder(path, "llama", save_format=save_format, seed=seed, **kwargs)


def make_tiny_mistral(path: str, save_format: str = "pt", seed: int = 0, **kwargs) -> str:
  """Writes a tiny random Mistral checkpoint (see ``make_tiny_decoder``); returns ``path``."""
  return make_tiny_decoder(path, "mistral", save_format=save_format, seed=seed, **kwargs)


def make_tiny_gemma(path: str, save_format: str = "pt", seed: int = 0, **kwargs) -> str:
  """Writes a tiny random Gemma checkpoint (see ``make_tiny_decoder``); returns ``path``."""
  return make_tiny_decoder(path, "gemma", save_format=save_format, seed=seed, **kwargs)


def nvembed_config(text_config: dict[str, Any], num_latents: int = 6, num_heads: int = 2,
                   head_dim: int = 16) -> dict[str, Any]:
  """An NV-Embed-v2 style ``config.json`` dict around a Mistral ``text_config`` (as the hub's:
  ``bidir_mistral`` text model, latent-attention pooler, right padding, instruction masked)."""
  width = int(text_config["hidden_size"])
  return {"model_type": "nvembed", "architectures": ["NVEmbedModel"], "hidden_size": width,
          "padding_side": "right", "is_mask_instruction": True, "add_eos": True,
          "add_pad_token": True, "mask_type": "b",
          "text_config": dict(text_config, model_type="bidir_mistral"),
          "latent_attention_config": {"model_type": "latent_attention", "latent_dim": width,
                                      "hidden_dim": width, "num_latents_value": num_latents,
                                      "num_cross_heads": num_heads, "cross_dim_head": head_dim,
                                      "output_normalize": True}}


def make_tiny_nvembed(path: str, save_format: str = "pt", seed: int = 0, **latent) -> str:
  """Writes a tiny random NV-Embed-v2 style checkpoint; returns ``path``.

  A tiny Mistral (``make_tiny_mistral``: PyTorch-initialised for ``save_format="pt"``; its
  tokenizer adds BOS only and pads on the right, as NV-Embed's) saved under
  ``embedding_model.*``, and a seeded random latent-attention pooler under
  ``latent_attention_model.*``, with :func:`nvembed_config`'s config.json (``latent``: its
  ``num_latents`` / ``num_heads`` / ``head_dim``).
  """
  import json
  make_tiny_mistral(path, save_format=save_format, seed=seed, add_eos=False,
                    padding_side="right")
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    config = nvembed_config(json.load(f), **latent)
  pooler = random_state_dict(config, seed + 1, std=0.2)
  state = {"embedding_model." + k: np.asarray(v, np.float32)
           for k, v in weights.read_state_dict(path).items()}
  state.update({k: v for k, v in pooler.items() if k.startswith("latent_attention_model.")})
  weights.write_safetensors(state, os.path.join(path, weights.SINGLE))
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return path


def make_tiny_t5(path: str, save_format: str = "pt", seed: int = 0, mt5: bool = False,
                 encoder_only: bool = True, corpus=CORPUS) -> str:
  """Writes a tiny random T5 (or mT5) checkpoint with a Unigram tokenizer; returns ``path``.

  T5 v1.1 style, as GTR and sentence-T5 (gated-GELU feed-forward, relative position buckets);
  the tokenizer appends ``</s>`` and pads on the right with ``<pad>`` = 0. ``encoder_only=False``
  writes a full encoder-decoder model (``T5ForConditionalGeneration``), whose encoder align_jax
  loads the same way.
  """
  from tokenizers import processors
  backend = _metaspace_tokenizer(["<pad>", "</s>", "<unk>"], "<unk>", corpus, unigram=True)
  backend.post_processor = processors.TemplateProcessing(
    single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  tok = transformers.T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                                     pad_token="<pad>", extra_ids=0)
  tok.save_pretrained(path)
  prefix = "MT5" if mt5 else "T5"
  config = getattr(transformers, f"{prefix}Config")(
    vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=1,
    num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
    relative_attention_max_distance=20, pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0, tie_word_embeddings=False)
  torch_cls = f"{prefix}EncoderModel" if encoder_only else f"{prefix}ForConditionalGeneration"
  _save_model(path, config, torch_cls, save_format, seed, flax_std=0.2)
  return path
