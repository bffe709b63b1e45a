"""align_jax.encoders.t5 (T5, mT5 encoder; a full T5 checkpoint's encoder) against PyTorch.

Tiny random checkpoints are saved here by transformers
(``save_pretrained(safe_serialization=True)``), read with align_jax.encoders.weights, loaded and
run on a right-padded batch of texts of different lengths (one long enough that the logarithmic
relative-position buckets are used). References: PyTorch float32 on the same batch (every hidden
state on real tokens) and on each text alone (the pooled features). Relative error =
max |ours - torch| / max |torch|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.encoders import t5
from align_jax.encoders.relative_position import relative_position_buckets
from helpers_parity import load, max_rel, save_random_models

TOL = 1e-5
BF16_TOL = 5e-2
LENGTHS = (9, 4, 14)
COMMON = dict(vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=3,
              num_decoder_layers=1, relative_attention_num_buckets=16,
              relative_attention_max_distance=12, pad_token_id=0)
VARIANTS = {
    "t5": ("T5Config", "T5EncoderModel", dict(feed_forward_proj="relu")),
    "t5_gated": ("T5Config", "T5EncoderModel", dict(feed_forward_proj="gated-gelu")),
    "mt5": ("MT5Config", "MT5EncoderModel", dict()),
    "t5_full": ("T5Config", "T5Model", dict(feed_forward_proj="relu")),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, torch):
  # random layer-norm weights
  return save_random_models(tmp_path_factory.mktemp("enc_t5"), VARIANTS, COMMON,
                            lambda key: (1.0, 0.5) if "layer_norm" in key else None, torch)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(LENGTHS), max(LENGTHS)), np.int32)
  mask = np.zeros_like(ids)
  texts = []
  for row, n in enumerate(LENGTHS):
    text = rng.integers(3, COMMON["vocab_size"], size=n)
    ids[row, :n], mask[row, :n] = text, 1
    texts.append(text)
  return ids, mask, texts


def _torch_hidden(torch, folder, name, ids, mask):
  import transformers
  model = getattr(transformers, VARIANTS[name][1]).from_pretrained(folder).eval()
  encoder = model.get_encoder() if name == "t5_full" else model
  with torch.no_grad():
    out = encoder(input_ids=torch.from_numpy(ids).long(),
                  attention_mask=torch.from_numpy(mask).long(), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


def _run(folder, ids, mask, dtype=jnp.float32, num_layers_to_run=None):
  config, flat = load(folder)
  model = t5.build(config, dtype=dtype, num_layers_to_run=num_layers_to_run)
  params = t5.load_params(flat, t5.read_config(config), num_layers_to_run,
                          dtype=None if dtype == jnp.float32 else jnp.bfloat16)
  return jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, output_hidden_states=True))(
      params, jnp.asarray(ids), jnp.asarray(mask))


def test_a_checkpoint_with_only_the_tied_embedding_copy_loads(checkpoints):
  config, flat = load(checkpoints["t5"])
  cfg = t5.read_config(config)
  moved = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
           for k, v in flat.items()}
  np.testing.assert_array_equal(t5.load_params(moved, cfg)["embed_tokens"]["embedding"],
                                t5.load_params(flat, cfg)["embed_tokens"]["embedding"])


def test_buckets_reach_the_logarithmic_range():
  buckets = relative_position_buckets(14, 14, True, 16, 12)
  assert buckets.max() == 15 and len(np.unique(buckets)) > 12  # both halves, log buckets used


@pytest.mark.parametrize("name", list(VARIANTS))
def test_t5_encoder_matches_pytorch(checkpoints, torch, name):
  ids, mask, texts = _batch()
  out = _run(checkpoints[name], ids, mask)
  want = _torch_hidden(torch, checkpoints[name], name, ids, mask)
  real = mask.astype(bool)
  assert len(out["hidden_states"]) == len(want) == COMMON["num_layers"] + 1
  errors = [max_rel(np.asarray(h)[real], w[real]) for h, w in zip(out["hidden_states"], want)]
  report = {"hidden": max(errors)}
  alone = [_torch_hidden(torch, checkpoints[name], name, t[None].astype(np.int32),
                         np.ones((1, len(t)), np.int32))[-1][0] for t in texts]
  for pooling, pick in (("mean", lambda a: a.mean(0)), ("last", lambda a: a[-1])):
    report[pooling] = max_rel(t5.pool(out["last_hidden_state"], jnp.asarray(mask), pooling)["pooled"],
                           np.stack([pick(a) for a in alone]))
  tokens = t5.pool(out["last_hidden_state"], jnp.asarray(mask), "tokens")
  report["tokens"] = max(max_rel(np.asarray(tokens["tokens"])[row][real[row]], a)
                         for row, a in enumerate(alone))
  print(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))
  assert max(report.values()) <= TOL, report


def test_num_layers_to_run_and_bfloat16(checkpoints, torch):
  ids, mask, _ = _batch()
  want = _torch_hidden(torch, checkpoints["mt5"], "mt5", ids, mask)
  real = mask.astype(bool)
  out = _run(checkpoints["mt5"], ids, mask, num_layers_to_run=1)
  assert len(out["hidden_states"]) == 2
  assert max_rel(np.asarray(out["last_hidden_state"])[real], want[1][real]) <= TOL
  half = _run(checkpoints["mt5"], ids, mask, dtype=jnp.bfloat16)
  error = max_rel(np.asarray(half["last_hidden_state"].astype(jnp.float32))[real], want[-1][real])
  print(f"mt5 bfloat16: rel error {error:.1e}")
  assert error <= BF16_TOL


def test_bad_input_is_named(checkpoints):
  config, flat = load(checkpoints["t5"])
  with pytest.raises(ValueError, match="supported: t5, mt5"):
    t5.build(dict(config, model_type="bart"))
  with pytest.raises(ValueError, match="not a T5 encoder checkpoint"):
    t5.load_params({"embed_tokens.weight": np.zeros((2, 2))}, t5.read_config(config))
  with pytest.raises(ValueError, match="cls.*valid: mean, last, tokens"):
    t5.pool(jnp.zeros((1, 2, 4)), jnp.ones((1, 2)), "cls")
