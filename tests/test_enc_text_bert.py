"""align_jax.encoders.bert (BERT, RoBERTa, XLM-R, MPNet, CLIP text, SigLIP text) against PyTorch.

Tiny random checkpoints are saved here by transformers' PyTorch classes
(``save_pretrained(safe_serialization=True)``), read with align_jax.encoders.weights, loaded and
run on a right-padded batch of texts of different lengths. References: PyTorch (eager, float32)
on the same batch (every hidden state, real tokens; the pooler outputs) and PyTorch on each text
alone (the pooled features). Relative error = max |ours - torch| / max |torch|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.encoders import bert
from helpers_parity import load, max_rel, save_random_models

TOL = 1e-5
BF16_TOL = 5e-2  # bfloat16 params and compute against the float32 PyTorch model
LENGTHS = (7, 4, 10)
EOS = 100  # CLIP's EOS id in these tiny configs; real-token ids are drawn below it
COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=64)
VARIANTS = {
    "bert": ("BertConfig", "BertModel", dict(pad_token_id=0)),
    "roberta": ("RobertaConfig", "RobertaModel", dict(pad_token_id=1, type_vocab_size=1)),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", dict(pad_token_id=1)),
    "mpnet": ("MPNetConfig", "MPNetModel", dict(pad_token_id=1)),
    "clip": ("CLIPTextConfig", "CLIPTextModel", dict(eos_token_id=EOS, pad_token_id=0,
                                                    hidden_act="quick_gelu")),
    "siglip": ("SiglipTextConfig", "SiglipTextModel", dict(pad_token_id=0, projection_size=24)),
}
PAD = {"bert": 0, "roberta": 1, "xlm-roberta": 1, "mpnet": 1, "clip": 0, "siglip": 0}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, torch):
  # random LayerNorm / bias values, so each is exercised
  return save_random_models(tmp_path_factory.mktemp("enc_bert"), VARIANTS, COMMON,
                            lambda key: (0.0, 0.5) if "norm" in key.lower() or key.endswith("bias") else None, torch)


def _batch(name, lengths=LENGTHS, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.full((len(lengths), max(lengths)), PAD[name], np.int32)
  mask = np.zeros_like(ids)
  texts = []
  for row, n in enumerate(lengths):
    text = rng.integers(3, EOS, size=n)
    if name == "clip":
      text[-1] = EOS
    ids[row, :n] = text
    mask[row, :n] = 1
    texts.append(text)
  return ids, mask, texts


def _torch(torch, folder, name, ids, mask):
  import transformers
  model = getattr(transformers, VARIANTS[name][1]).from_pretrained(
      folder, attn_implementation="eager").eval()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long(), output_hidden_states=True)
  pooled = getattr(out, "pooler_output", None)
  return ([h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy(),
          None if pooled is None else pooled.numpy())


def _run(folder, ids, mask, dtype=jnp.float32, num_layers_to_run=None):
  config, flat = load(folder)
  model = bert.build(config, dtype=dtype, num_layers_to_run=num_layers_to_run)
  params = bert.load_params(flat, bert.read_config(config), num_layers_to_run,
                            dtype=None if dtype == jnp.float32 else jnp.bfloat16)
  out = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, output_hidden_states=True))(
      params, jnp.asarray(ids), jnp.asarray(mask))
  return model, out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_text_tower_matches_pytorch(checkpoints, torch, name):
  ids, mask, texts = _batch(name)
  model, out = _run(checkpoints[name], ids, mask)
  hidden, last, pooled = _torch(torch, checkpoints[name], name, ids, mask)
  real = mask.astype(bool)
  n = COMMON["num_hidden_layers"]
  assert len(out["hidden_states"]) == len(hidden) == n + 1
  # Layers 0..N-1 are transformers' hidden_states; layer N is the final output (last_hidden_state,
  # after CLIP / SigLIP's final norm).
  errors = [max_rel(np.asarray(h)[real], w[real]) for h, w in zip(out["hidden_states"][:n], hidden)]
  errors.append(max_rel(np.asarray(out["hidden_states"][n])[real], last[real]))
  assert max(errors) <= TOL, errors
  report = {"hidden": max(errors)}
  if name == "siglip":
    report["cls(head)"] = max_rel(bert.pool(model, out, ids, mask, "cls")["pooled"], pooled)
  if name == "clip":
    report["cls(eos)"] = max_rel(bert.pool(model, out, ids, mask, "cls")["pooled"], pooled)
  # Pooled features against PyTorch on each text alone.
  alone = [_torch(torch, checkpoints[name], name, t[None].astype(np.int32),
                  np.ones((1, len(t)), np.int32))[1][0] for t in texts]
  for pooling, pick in (("mean", lambda a: a.mean(0)), ("last", lambda a: a[-1]),
                        ("cls", lambda a: a[-1] if name == "clip" else a[0])):
    if pooling == "cls" and name == "siglip":
      continue  # its head reads the last *position*, padding included (compared above)
    report[pooling] = max_rel(bert.pool(model, out, ids, mask, pooling)["pooled"],
                           np.stack([pick(a) for a in alone]))
  tokens = bert.pool(model, out, ids, mask, "tokens")
  np.testing.assert_array_equal(np.asarray(tokens["mask"]), real)
  report["tokens"] = max(max_rel(np.asarray(tokens["tokens"])[row][real[row]], a)
                         for row, a in enumerate(alone))
  print(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))
  assert max(report.values()) <= TOL, report


def test_num_layers_to_run_and_bfloat16(checkpoints, torch):
  ids, mask, _ = _batch("mpnet")
  hidden, _, _ = _torch(torch, checkpoints["mpnet"], "mpnet", ids, mask)
  real = mask.astype(bool)
  _, out = _run(checkpoints["mpnet"], ids, mask, num_layers_to_run=2)
  assert len(out["hidden_states"]) == 3
  assert max_rel(np.asarray(out["last_hidden_state"])[real], hidden[2][real]) <= TOL
  _, half = _run(checkpoints["mpnet"], ids, mask, dtype=jnp.bfloat16)
  assert half["last_hidden_state"].dtype == jnp.bfloat16
  error = max_rel(np.asarray(half["last_hidden_state"].astype(jnp.float32))[real], hidden[-1][real])
  print(f"mpnet bfloat16: rel error {error:.1e}")
  assert error <= BF16_TOL


def test_wrapped_checkpoints_and_bad_input(checkpoints):
  config, flat = load(checkpoints["roberta"])
  cfg = bert.read_config(config)
  plain = bert.load_params(flat, cfg)
  wrapped = bert.load_params({"roberta." + k: v for k, v in flat.items()}, cfg)
  np.testing.assert_array_equal(plain["layers"]["query"]["kernel"],
                                wrapped["layers"]["query"]["kernel"])
  clip_config, clip_flat = load(checkpoints["clip"])
  full = {"model_type": "clip", "text_config": clip_config, "vision_config": {}}
  assert bert.build(full).config == bert.build(clip_config).config
  with pytest.raises(ValueError, match="not a bert text checkpoint"):
    bert.load_params(clip_flat, bert.read_config(load(checkpoints["bert"])[0]))
  with pytest.raises(ValueError, match="supported: bert, roberta"):
    bert.build(dict(config, model_type="electra"))
  with pytest.raises(ValueError, match="exceed .* max_position_embeddings 64"):
    model = bert.build(config)
    ids = jnp.ones((1, 70), jnp.int32) * 5
    model.apply({"params": plain}, ids, jnp.ones_like(ids))
