"""Decoder-LLM (Llama, Mistral, Gemma) and T5 / mT5 text encoders against transformers PyTorch.

Tiny random checkpoints (align_jax.testing.tiny_checkpoints) are saved by PyTorch as safetensors
(and some by align_jax's own modules through the reverse name table, ``save_format="flax"``), loaded
through ``TextEncoder`` and compared with the PyTorch model to 1e-4. Two references: the batched
PyTorch model on the same padded ids (every real token), and PyTorch run on each text alone,
unpadded (the pooled features: padding, on either side, must not change them).
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import encoders
from align_jax.encoders import decoder, weights
from align_jax.testing import tiny_checkpoints as tiny

TOL = 1e-4
TEXTS = [
  "a cat",
  "That is a happy zebra!",
  "",
  "two people ride bicycles along the river while the quick brown fox jumps over the lazy dog "
  "and an aerial view of mountains covered in snow",
]
DECODERS = ("llama", "mistral", "gemma")
TORCH_CLASSES = {"llama": "LlamaModel", "mistral": "MistralModel", "gemma": "GemmaModel",
                 "t5": "T5EncoderModel", "mt5": "MT5EncoderModel"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, torch):
  root = tmp_path_factory.mktemp("tiny_llms")
  made = {}
  for family in DECODERS:
    made[family, "pt"] = getattr(tiny, f"make_tiny_{family}")(str(root / family))
  made["mistral", "no_window"] = tiny.make_tiny_mistral(str(root / "mistral_no_window"),
                                                        sliding_window=None)
  made["llama", "flax"] = tiny.make_tiny_llama(str(root / "llama_flax"), save_format="flax")
  made["mistral", "window"] = tiny.make_tiny_mistral(str(root / "mistral_window"),
                                                     sliding_window=3)
  made["t5", "pt"] = tiny.make_tiny_t5(str(root / "t5"))
  made["t5", "flax"] = tiny.make_tiny_t5(str(root / "t5_flax"), save_format="flax")
  made["t5", "full"] = tiny.make_tiny_t5(str(root / "t5_full"), encoder_only=False)
  made["mt5", "pt"] = tiny.make_tiny_t5(str(root / "mt5"), mt5=True)
  return made


def _torch_model(torch, family, folder):
  import transformers
  cls = getattr(transformers, TORCH_CLASSES[family])
  kwargs = {} if family in ("t5", "mt5") else {"attn_implementation": "eager"}
  return cls.from_pretrained(folder, **kwargs).eval()


def _torch_tokens(torch, model, ids, mask, decoder):
  """PyTorch last hidden states; decoders get generate()'s position ids (cumsum of the mask)."""
  kwargs = {}
  if decoder:
    positions = np.cumsum(mask, axis=1) - 1
    kwargs["position_ids"] = torch.from_numpy(np.where(mask == 0, 1, positions)).long()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(np.asarray(ids)).long(),
                attention_mask=torch.from_numpy(np.asarray(mask)).long(), **kwargs)
  return out.last_hidden_state.numpy()


def _unpadded_reference(torch, model, inputs, decoder):
  """Per text, PyTorch on its real tokens only: {"last": [B, D], "mean": [B, D]}."""
  last, mean = [], []
  for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
    real = ids[mask.astype(bool)][None]
    tokens = _torch_tokens(torch, model, real, np.ones_like(real), decoder)[0]
    last.append(tokens[-1])
    mean.append(tokens.mean(0))
  return {"last": np.stack(last), "mean": np.stack(mean)}


def _check_against_torch(torch, family, folder, padding_side, poolings, max_length=16,
                         prefix=""):
  decoder = family in DECODERS
  model = _torch_model(torch, family, folder)
  reference = None
  for pooling in poolings:
    enc = encoders.TextEncoder.from_pretrained(folder, pooling=pooling, max_length=max_length,
                                               padding_side=padding_side, prefix=prefix)
    inputs = enc.preprocess(TEXTS)
    mask = inputs["attention_mask"]
    assert inputs["input_ids"].shape == (4, max_length)
    assert 0 < mask[0].sum() < max_length and mask[3].sum() == max_length  # padding, truncation
    assert mask[0, 0 if padding_side == "left" else -1] == 0  # padded on the side asked for
    if reference is None:
      reference = _unpadded_reference(torch, model, inputs, decoder)
      reference["tokens"] = _torch_tokens(torch, model, inputs["input_ids"], mask, decoder)
    out = enc.apply(enc.params, inputs)
    if pooling == "tokens":
      valid = mask.astype(bool)
      np.testing.assert_array_equal(out["mask"], valid)
      np.testing.assert_allclose(np.asarray(out["tokens"])[valid], reference["tokens"][valid],
                                 atol=TOL)
    else:
      assert out["pooled"].shape == (4, enc.output_dim) and out["pooled"].dtype == jnp.float32
      np.testing.assert_allclose(out["pooled"], reference[pooling], atol=TOL)
  return reference


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family,fmt", [("llama", "pt"), ("mistral", "pt"), ("gemma", "pt"),
                                        ("llama", "flax")])
def test_decoder_matches_pytorch_with_left_and_right_padding(checkpoints, torch, family, fmt,
                                                             padding_side):
  _check_against_torch(torch, family, checkpoints[family, fmt], padding_side,
                       ("last", "mean", "tokens"))


@pytest.mark.parametrize("window", ["window", "no_window"])
def test_mistral_sliding_window_matches_pytorch(checkpoints, torch, window):
  """A window (3) shorter than the texts (keys i - w < j <= i, as PyTorch), and none."""
  _check_against_torch(torch, "mistral", checkpoints["mistral", window], "right",
                       ("last", "tokens"))


@pytest.mark.parametrize("family,fmt", [("t5", "pt"), ("t5", "flax"), ("t5", "full"),
                                        ("mt5", "pt")])
def test_t5_encoder_matches_pytorch(checkpoints, torch, family, fmt):
  """GTR / sentence-T5 style mean pooling (and the EOS token, and all tokens); a full
  encoder-decoder checkpoint loads its encoder."""
  _check_against_torch(torch, family, checkpoints[family, fmt], "right",
                       ("mean", "last", "tokens"))


def test_left_padding_gives_the_features_of_the_unpadded_text(checkpoints):
  """Position ids count real tokens: a text's features do not depend on its batch's padding."""
  folder = checkpoints["llama", "pt"]
  long = encoders.TextEncoder.from_pretrained(folder, pooling="last", max_length=32,
                                              padding_side="left")
  text = ["a happy dog"]
  n = int(long.preprocess(text)["attention_mask"].sum())
  short = encoders.TextEncoder.from_pretrained(folder, pooling="last", max_length=n)
  assert short.preprocess(text)["attention_mask"].all()  # no padding at all
  np.testing.assert_allclose(long.encode(text, batch_size=1), short.encode(text, batch_size=1),
                             atol=1e-5)
  np.testing.assert_array_equal(decoder.position_ids(jnp.array([[0, 0, 1, 1, 1]])),
                                [[0, 0, 0, 1, 2]])


def test_instruction_prefix_is_tokenized_with_each_text(checkpoints, torch):
  folder = checkpoints["mistral", "pt"]
  prefix = "Instruct: find the photo\nQuery: "
  enc = encoders.TextEncoder.from_pretrained(folder, pooling="last", max_length=48,
                                             prefix=prefix)
  assert enc.prefix == prefix
  inputs = enc.preprocess(TEXTS)
  ref = enc.tokenizer([prefix + t for t in TEXTS], padding="max_length", truncation=True,
                      max_length=48, return_tensors="np")
  np.testing.assert_array_equal(inputs["input_ids"], ref["input_ids"])
  assert inputs["attention_mask"][0].sum() < 48  # padded, so the last-token pick is exercised
  out = enc.apply(enc.params, inputs)["pooled"]
  expected = _unpadded_reference(torch, _torch_model(torch, "mistral", folder), inputs, True)
  np.testing.assert_allclose(out, expected["last"], atol=TOL)
  plain = encoders.TextEncoder.from_pretrained(folder, pooling="last", max_length=48)
  assert np.max(np.abs(np.asarray(out) - plain.apply(plain.params, plain.preprocess(TEXTS))[
      "pooled"])) > 1e-3  # the prefix changes the features


def test_llama_tokenizer_without_pad_token_pads_with_eos(checkpoints):
  import transformers
  folder = checkpoints["llama", "pt"]
  assert transformers.AutoTokenizer.from_pretrained(folder).pad_token is None
  enc = encoders.TextEncoder.from_pretrained(folder, pooling="last", max_length=12)
  tokens = enc.preprocess(["a cat"])
  eos = enc.tokenizer.eos_token_id
  assert enc.tokenizer.pad_token_id == eos and enc.tokenizer.padding_side == "left"
  assert tokens["input_ids"][0, -1] == eos and tokens["attention_mask"][0, -1] == 1  # appended
  assert (tokens["input_ids"][0, :8] == eos).all() and tokens["attention_mask"][0, :8].sum() == 0


def test_sharded_safetensors_load_like_one_file(checkpoints, tmp_path, torch, monkeypatch):
  import transformers
  folder = checkpoints["gemma", "pt"]
  sharded = tmp_path / "gemma_sharded"
  transformers.GemmaModel.from_pretrained(folder).save_pretrained(
      sharded, safe_serialization=True, max_shard_size="20KB")
  for name in os.listdir(folder):
    if name.startswith(("tokenizer", "special_tokens")):
      shutil.copy(os.path.join(folder, name), sharded)
  shards = [n for n in os.listdir(sharded) if n.endswith(".safetensors")]
  assert len(shards) > 3 and os.path.isfile(sharded / weights.SHARD_INDEX)
  one = encoders.TextEncoder.from_pretrained(folder, pooling="mean", max_length=16)
  many = encoders.TextEncoder.from_pretrained(str(sharded), pooling="mean", max_length=16)
  jax.tree.map(np.testing.assert_array_equal, one.params, many.params)

  # A hub id of a sharded repo downloads the shards (a stand-in for the hub copies the files
  # that snapshot_download's allow_patterns select from the "remote" folder).
  import fnmatch
  import huggingface_hub
  downloads = tmp_path / "hub"

  def snapshot_download(repo_id, allow_patterns):
    assert repo_id == "align-jax-tests/sharded-gemma"
    downloads.mkdir(exist_ok=True)
    for name in os.listdir(sharded):
      if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
        shutil.copy(sharded / name, downloads)
    return str(downloads)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  hub = encoders.TextEncoder.from_pretrained("align-jax-tests/sharded-gemma", pooling="mean",
                                             max_length=16)
  assert sorted(n for n in os.listdir(downloads) if n.endswith(".safetensors")) == sorted(shards)
  jax.tree.map(np.testing.assert_array_equal, one.params, hub.params)

  os.remove(sharded / sorted(shards)[1])
  with pytest.raises(ValueError, match=f"shard {sorted(shards)[1]} listed in .* is missing"):
    encoders.TextEncoder.from_pretrained(str(sharded), max_length=16)


def test_params_stay_in_host_memory_in_the_compute_dtype(checkpoints):
  """The frozen LLM params are numpy (placed later by the sharding rules), bfloat16 if asked."""
  enc = encoders.TextEncoder.from_pretrained(checkpoints["llama", "pt"], pooling="last",
                                             max_length=16, dtype="bfloat16")
  leaves = jax.tree.leaves(enc.params)
  assert all(isinstance(x, np.ndarray) and x.dtype == jnp.bfloat16 for x in leaves)
  f32 = encoders.TextEncoder.from_pretrained(checkpoints["llama", "pt"], pooling="last",
                                             max_length=16)
  a, b = f32.encode(TEXTS), enc.encode(TEXTS)
  assert b.dtype == np.float32
  cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  assert np.all(cos > 0.99) and np.max(np.abs(a - b)) > 1e-6


def test_unsupported_settings_are_refused_in_one_line(checkpoints, tmp_path):
  folder = checkpoints["llama", "pt"]
  with pytest.raises(ValueError, match="no summary token at position 0.*text_pooling=last"):
    encoders.TextEncoder.from_pretrained(folder, pooling="cls")
  with pytest.raises(ValueError, match="'left' or 'right'"):
    encoders.TextEncoder.from_pretrained(folder, padding_side="middle")
  with pytest.raises(ValueError, match="max_length must be in \\[1, 64\\]"):
    encoders.TextEncoder.from_pretrained(folder, max_length=65)
  bert = tiny.make_tiny_bert(str(tmp_path / "bert"), save_format="flax")
  with pytest.raises(ValueError, match="padding_side is for decoder LLMs and T5"):
    encoders.TextEncoder.from_pretrained(bert, padding_side="left")
  with pytest.raises(ValueError, match="bidirectional is for decoder LLMs") as info:
    encoders.TextEncoder.from_pretrained(bert, max_length=16, bidirectional=True)
  assert "\n" not in str(info.value)
  bart = tmp_path / "bart"
  bart.mkdir()
  (bart / "config.json").write_text('{"model_type": "bart"}')
  with pytest.raises(ValueError, match="unsupported text encoder family 'bart'.*llama, "
                                       "mistral, qwen2, qwen3, gemma, t5, mt5, nvembed$"):
    encoders.TextEncoder.from_pretrained(str(bart))
  with pytest.raises(ValueError, match="pooling 'latent' is NV-Embed's.*text_pooling=mean"):
    encoders.TextEncoder.from_pretrained(folder, pooling="latent")


def test_nvembed_latent_pooling_matches_pytorch_and_its_abstract_shapes(torch, tmp_path):
  """NV-Embed-v2 (tiny: bidirectional Mistral + latent-attention pooler) through TextEncoder,
  against NV-Embed's recipe written out with PyTorch: EOS appended, right padding with EOS, the
  instruction's first len(tokenize(prefix)) positions left out of the pooled mean."""
  import json

  import transformers
  from helpers_nvembed import torch_bidirectional_mistral, torch_latent_pooler
  folder = tiny.make_tiny_nvembed(str(tmp_path / "nvembed"))
  prefix, length = "a photo of the city\nthat is ", 24
  enc = encoders.TextEncoder.from_pretrained(folder, pooling="latent", max_length=length,
                                             prefix=prefix)
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  tok.pad_token, tok.padding_side = tok.eos_token, "right"
  want_inputs = tok([prefix + t + tok.eos_token for t in TEXTS], padding="max_length",
                    truncation=True, max_length=length, return_tensors="np")
  inputs = enc.preprocess(TEXTS)
  np.testing.assert_array_equal(inputs["input_ids"], want_inputs["input_ids"])
  np.testing.assert_array_equal(inputs["attention_mask"], want_inputs["attention_mask"])
  ids, mask = inputs["input_ids"], inputs["attention_mask"]
  pool_mask = mask.copy()
  pool_mask[:, :len(tok.tokenize(prefix))] = 0
  state = weights.read_state_dict(folder)
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  hidden = torch_bidirectional_mistral(torch, state, config["text_config"], ids, mask)
  heads = config["latent_attention_config"]["num_cross_heads"]
  want = torch_latent_pooler(torch, state, hidden, pool_mask, heads)
  ours = enc.encode(TEXTS, batch_size=len(TEXTS))
  error = float(np.max(np.abs(ours - want)) / np.max(np.abs(want)))
  print(f"nvembed TextEncoder latent: rel error {error:.1e}")
  assert ours.shape == (len(TEXTS), 32) and error <= 1e-5
  unmasked = torch_latent_pooler(torch, state, hidden, mask, heads)
  assert np.max(np.abs(ours - unmasked)) > 1e-3  # the instruction mask changes the features
  mean = encoders.TextEncoder.from_pretrained(folder, pooling="mean", max_length=length,
                                              prefix=prefix).apply(enc.params, inputs)["pooled"]
  m = pool_mask[..., None].astype(np.float64)
  np.testing.assert_allclose(mean, (hidden * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-6)

  bf16 = encoders.TextEncoder.from_pretrained(folder, pooling="latent", max_length=length,
                                              prefix=prefix, dtype="bfloat16")
  assert {str(x.dtype) for x in jax.tree.leaves(bf16.params)} == {"bfloat16"}
  bf16_error = float(np.max(np.abs(bf16.encode(TEXTS, batch_size=len(TEXTS)) - want))
                     / np.max(np.abs(want)))
  print(f"nvembed TextEncoder latent bfloat16: rel error {bf16_error:.1e}")
  assert bf16_error <= 5e-2

  abstract = encoders.TextEncoder.from_pretrained(folder, pooling="latent", max_length=length,
                                                  prefix=prefix, abstract=True)
  shape = lambda t: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), t)
  assert shape(abstract.params) == shape(enc.params)
  assert set(abstract.params) == {"model", "pooler"}
  out = jax.eval_shape(abstract.apply, abstract.params, inputs)
  assert out["pooled"].shape == (len(TEXTS), 32)
  with pytest.raises(ValueError, match="attends bidirectionally.*latent"):
    encoders.TextEncoder.from_pretrained(folder, pooling="last", abstract=True)
  with pytest.raises(ValueError, match="'latent' pooler reads the final output"):
    encoders.TextEncoder.from_pretrained(folder, pooling="latent", layer=1, abstract=True)
