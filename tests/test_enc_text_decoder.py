"""align_jax.encoders.decoder (Llama, Mistral, Qwen2, Qwen3, Gemma) and nvembed vs PyTorch.

Tiny random checkpoints are built and saved here with ``save_pretrained(safe_serialization=True)``,
read back with align_jax.encoders.weights (PyTorch-named numpy), loaded and run. Two references:
PyTorch (eager attention, float32) on the same padded batch with generate()'s position ids
(every hidden state, real tokens), and PyTorch on each text alone, unpadded (the pooled
features: padding on either side must not change them). Relative error = max |ours - torch| /
max |torch|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.encoders import decoder
from helpers_nvembed import torch_latent_pooler
from helpers_parity import load, max_rel, save_random_models

TOL = 1e-5
BF16_TOL = 5e-2  # bfloat16 params and compute against the float32 PyTorch model
LENGTHS = (7, 4, 10)  # a batch of texts of different lengths, padded to 10
BASE = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6, tie_word_embeddings=False)
VARIANTS = {
    "llama": ("LlamaConfig", "LlamaModel", dict(rope_theta=500000.0)),
    "llama3_scaling": ("LlamaConfig", "LlamaModel", dict(
        rope_theta=500000.0, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", "MistralModel", dict(sliding_window=None, head_dim=16)),
    "mistral_window": ("MistralConfig", "MistralModel", dict(sliding_window=3)),
    "qwen2": ("Qwen2Config", "Qwen2Model", dict(rope_theta=1e6, use_sliding_window=False)),
    "qwen2_yarn": ("Qwen2Config", "Qwen2Model", dict(
        use_sliding_window=False,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen3": ("Qwen3Config", "Qwen3Model", dict(head_dim=16, rope_theta=1e6)),
    "gemma": ("GemmaConfig", "GemmaModel", dict(head_dim=16, hidden_act="gelu_pytorch_tanh")),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, torch):
  # random norm weights, so (1 + w) vs w and q/k norms are exercised
  return save_random_models(tmp_path_factory.mktemp("enc_decoders"), VARIANTS, BASE,
                            lambda key: (0.0, 0.5) if "norm" in key else None, torch)


def _torch_model(torch, folder, name):
  import transformers
  cls = getattr(transformers, VARIANTS[name][1])
  return cls.from_pretrained(folder, attn_implementation="eager").eval()


def _batch(side, lengths=LENGTHS, seed=0):
  rng = np.random.default_rng(seed)
  width = max(lengths)
  ids = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros((len(lengths), width), np.int32)
  texts = []
  for row, n in enumerate(lengths):
    text = rng.integers(3, BASE["vocab_size"], size=n)
    texts.append(text)
    cols = slice(width - n, width) if side == "left" else slice(0, n)
    ids[row, cols] = text
    mask[row, cols] = 1
  return ids, mask, texts


def _torch_hidden(torch, model, ids, mask, bidirectional=False):
  positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)
  kwargs = dict(input_ids=torch.from_numpy(ids).long(),
                position_ids=torch.from_numpy(positions).long(), output_hidden_states=True)
  if bidirectional:
    allowed = mask[:, None, None, :].astype(bool).repeat(ids.shape[1], axis=2)
    kwargs["attention_mask"] = torch.from_numpy(
        np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32))
  else:
    kwargs["attention_mask"] = torch.from_numpy(mask).long()
  with torch.no_grad():
    out = model(**kwargs)
  return [h.numpy() for h in out.hidden_states]


_COMPILED = {}  # one compiled forward per checkpoint and setting (left / right padding share it)


def _run(folder, ids, mask, dtype=jnp.float32, **build_kwargs):
  key = (folder, jnp.dtype(dtype).name, tuple(sorted(build_kwargs.items())))
  if key not in _COMPILED:
    config, flat = load(folder)
    model = decoder.build(config, dtype=dtype, **build_kwargs)
    params = decoder.load_params(flat, decoder.read_config(config),
                                 build_kwargs.get("num_layers_to_run"),
                                 dtype=None if dtype == jnp.float32 else jnp.bfloat16)
    fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, output_hidden_states=True))
    _COMPILED[key] = (fn, params)
  fn, params = _COMPILED[key]
  return fn(params, jnp.asarray(ids), jnp.asarray(mask))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_decoder_matches_pytorch(checkpoints, torch, name, side):
  ids, mask, texts = _batch(side)
  out = _run(checkpoints[name], ids, mask)
  model = _torch_model(torch, checkpoints[name], name)
  want = _torch_hidden(torch, model, ids, mask)
  real = mask.astype(bool)
  assert len(out["hidden_states"]) == len(want) == BASE["num_hidden_layers"] + 1
  errors = [max_rel(np.asarray(h)[real], w[real]) for h, w in zip(out["hidden_states"], want)]
  assert max(errors) <= TOL, errors
  assert max_rel(np.asarray(out["last_hidden_state"])[real], want[-1][real]) <= TOL
  print(f"decoder {name} {side}-padded: max rel error {max(errors):.1e}")
  # Pooled features equal PyTorch on each text alone, whatever the padding side.
  alone = [_torch_hidden(torch, model, t[None].astype(np.int32),
                         np.ones((1, len(t)), np.int32))[-1][0] for t in texts]
  last = decoder.pool(out["last_hidden_state"], jnp.asarray(mask), "last")["pooled"]
  mean = decoder.pool(out["last_hidden_state"], jnp.asarray(mask), "mean")["pooled"]
  tokens = decoder.pool(out["last_hidden_state"], jnp.asarray(mask), "tokens")
  assert max_rel(last, np.stack([a[-1] for a in alone])) <= TOL
  assert max_rel(mean, np.stack([a.mean(0) for a in alone])) <= TOL
  print(f"decoder {name} {side}: last {max_rel(last, np.stack([a[-1] for a in alone])):.1e} "
        f"mean {max_rel(mean, np.stack([a.mean(0) for a in alone])):.1e}")
  np.testing.assert_array_equal(np.asarray(tokens["mask"]), real)
  for row, a in enumerate(alone):
    assert max_rel(np.asarray(tokens["tokens"])[row][real[row]], a) <= TOL


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_bidirectional_matches_pytorch_with_a_full_mask(checkpoints, torch, name):
  ids, mask, _ = _batch("right")
  out = _run(checkpoints[name], ids, mask, bidirectional=True)
  want = _torch_hidden(torch, _torch_model(torch, checkpoints[name], name), ids, mask,
                       bidirectional=True)
  real = mask.astype(bool)
  assert max(max_rel(np.asarray(h)[real], w[real])
             for h, w in zip(out["hidden_states"], want)) <= TOL
  causal = _run(checkpoints[name], ids, mask)
  assert max_rel(causal["last_hidden_state"], out["last_hidden_state"]) > 1e-2  # not a no-op


def test_num_layers_to_run_returns_that_hidden_layer_and_loads_only_its_layers(checkpoints, torch):
  ids, mask, _ = _batch("left")
  config, flat = load(checkpoints["qwen3"])
  params = decoder.load_params(flat, decoder.read_config(config), num_layers_to_run=2)
  assert params["layers"]["q_proj"]["kernel"].shape[0] == 2 and "norm" not in params
  out = _run(checkpoints["qwen3"], ids, mask, num_layers_to_run=2)
  want = _torch_hidden(torch, _torch_model(torch, checkpoints["qwen3"], "qwen3"), ids, mask)
  real = mask.astype(bool)
  assert len(out["hidden_states"]) == 3
  assert max_rel(np.asarray(out["last_hidden_state"])[real], want[2][real]) <= TOL
  zero = _run(checkpoints["qwen3"], ids, mask, num_layers_to_run=0)
  assert max_rel(np.asarray(zero["last_hidden_state"])[real], want[0][real]) <= TOL


@pytest.mark.parametrize("name", ["llama3_scaling", "gemma"])
def test_bfloat16_is_close_to_float32_pytorch(checkpoints, torch, name):
  ids, mask, _ = _batch("left")
  out = _run(checkpoints[name], ids, mask, dtype=jnp.bfloat16)
  assert out["last_hidden_state"].dtype == jnp.bfloat16
  want = _torch_hidden(torch, _torch_model(torch, checkpoints[name], name), ids, mask)
  real = mask.astype(bool)
  error = max_rel(np.asarray(out["last_hidden_state"].astype(jnp.float32))[real], want[-1][real])
  print(f"decoder {name} bfloat16: rel error {error:.1e}")
  assert error <= BF16_TOL


def test_layers_are_scanned_so_the_program_does_not_grow_with_depth():
  """The lowered program of a 2-layer and a 12-layer model differ only in the stacked shapes."""
  ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  sizes = {}
  for depth in (2, 12):
    model = decoder.build(dict(BASE, model_type="qwen3", num_hidden_layers=depth, head_dim=8))
    params = decoder.abstract_params(model.config)
    assert params["layers"]["q_proj"]["kernel"].shape[0] == depth
    text = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m)).trace(
        params, ids, ids).lower().as_text()
    sizes[depth] = len(text.splitlines())
  assert abs(sizes[12] - sizes[2]) <= 2, sizes


def test_transformers5_rope_parameters_give_the_same_frequencies(checkpoints):
  from align_jax.encoders import rope
  config, _ = load(checkpoints["llama3_scaling"])  # saved in 4.x's or 5.x's form
  params = config.get("rope_parameters") or dict(config["rope_scaling"],
                                                 rope_theta=config["rope_theta"])
  base = {k: v for k, v in config.items()
          if k not in ("rope_theta", "rope_scaling", "rope_parameters")}
  v4 = dict(base, rope_theta=params["rope_theta"],
            rope_scaling={k: v for k, v in params.items() if k != "rope_theta"})
  v5 = dict(base, rope_parameters=params)
  old, new = rope.inverse_frequencies(v4), rope.inverse_frequencies(v5)
  np.testing.assert_array_equal(old[0], new[0])
  plain = rope.inverse_frequencies(dict(base, rope_theta=params["rope_theta"]))[0]
  assert not np.allclose(old[0], plain)  # the llama3 scaling does change the frequencies


def test_prefixed_state_dicts_load_and_bad_input_is_named(checkpoints):
  config, flat = load(checkpoints["llama"])
  cfg = decoder.read_config(config)
  plain = decoder.load_params(flat, cfg)
  prefixed = decoder.load_params({"model." + k: v for k, v in flat.items()}, cfg)
  np.testing.assert_array_equal(plain["layers"]["o_proj"]["kernel"],
                                prefixed["layers"]["o_proj"]["kernel"])
  with pytest.raises(ValueError, match="supported: llama, mistral, qwen2, qwen3, gemma"):
    decoder.build(dict(config, model_type="gpt2"))
  with pytest.raises(ValueError, match="rope_scaling type 'longrope' is not supported"):
    decoder.build(dict({k: v for k, v in config.items() if k != "rope_parameters"},
                       rope_scaling={"rope_type": "longrope", "factor": 2.0}))
  with pytest.raises(ValueError, match="not a decoder LLM checkpoint"):
    decoder.load_params({"foo.weight": np.zeros(2)}, cfg)


def test_nvembed_bidirectional_mistral_and_latent_pooling(checkpoints, torch):
  from align_jax.encoders import nvembed
  mistral_config, mistral_state = load(checkpoints["mistral_window"])
  rng = np.random.default_rng(1)
  width, heads, head_dim, latents = BASE["hidden_size"], 2, 16, 6
  pooler = {"latents": rng.normal(size=(latents, width)),
            "cross_attend_blocks.0.norm.weight": 1 + 0.3 * rng.normal(size=width),
            "cross_attend_blocks.0.norm.bias": 0.3 * rng.normal(size=width),
            "cross_attend_blocks.0.norm_context.weight": 1 + 0.3 * rng.normal(size=width),
            "cross_attend_blocks.0.norm_context.bias": 0.3 * rng.normal(size=width),
            "cross_attend_blocks.0.fn.to_q.weight": 0.2 * rng.normal(size=(heads * head_dim,
                                                                         width)),
            "cross_attend_blocks.0.fn.to_kv.weight": 0.2 * rng.normal(size=(2 * heads * head_dim,
                                                                          width)),
            "cross_attend_blocks.0.fn.to_out.weight": 0.2 * rng.normal(size=(width,
                                                                           heads * head_dim)),
            "cross_attend_blocks.1.norm.weight": 1 + 0.3 * rng.normal(size=width),
            "cross_attend_blocks.1.norm.bias": 0.3 * rng.normal(size=width),
            "cross_attend_blocks.1.fn.net.0.weight": 0.2 * rng.normal(size=(8 * width, width)),
            "cross_attend_blocks.1.fn.net.0.bias": 0.2 * rng.normal(size=8 * width),
            "cross_attend_blocks.1.fn.net.2.weight": 0.2 * rng.normal(size=(width, 4 * width)),
            "cross_attend_blocks.1.fn.net.2.bias": 0.2 * rng.normal(size=width)}
  state = {"embedding_model." + k: v for k, v in mistral_state.items()}
  state.update({"latent_attention_model." + k: v.astype(np.float32) for k, v in pooler.items()})
  config = {"model_type": "nvembed",
            "text_config": dict(mistral_config, model_type="bidir_mistral"),
            "latent_attention_config": {"model_type": "latent_attention",
                                        "num_latents_value": latents, "latent_dim": width,
                                        "hidden_dim": width,
                                        "num_cross_heads": heads, "cross_dim_head": head_dim,
                                        "output_normalize": True}}
  cfg = nvembed.read_config(config)
  text_cfg, latent_cfg = cfg.text, cfg.latent
  ids, mask, _ = _batch("right")  # NV-Embed pads on the right
  model = decoder.build(text_cfg, bidirectional=True)
  tokens = model.apply({"params": decoder.load_params(state, text_cfg)}, ids, mask)
  module = nvembed.build_pooler(latent_cfg)
  pool_mask = mask.copy()
  pool_mask[:, :2] = 0  # an instruction prefix left out of the mean, as NV-Embed does
  ours = nvembed.pool(module, nvembed.load_pooler_params(state, latent_cfg),
                      tokens["last_hidden_state"], jnp.asarray(pool_mask))["pooled"]
  want_tokens = _torch_hidden(torch, _torch_model(torch, checkpoints["mistral_window"],
                                                  "mistral_window"), ids, mask,
                              bidirectional=True)[-1]
  real = mask.astype(bool)
  assert max_rel(np.asarray(tokens["last_hidden_state"])[real], want_tokens[real]) <= TOL
  want = torch_latent_pooler(torch, state, want_tokens, pool_mask, heads)
  error = max_rel(ours, want)
  print(f"nvembed latent pooling: rel error {error:.1e}")
  assert error <= TOL
  np.testing.assert_allclose(np.linalg.norm(np.asarray(ours), axis=-1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="no latent-attention pooler"):
    nvembed.load_pooler_params(mistral_state, latent_cfg)
