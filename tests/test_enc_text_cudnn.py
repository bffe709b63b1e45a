"""The text towers take cuDNN's fused attention on GPU: lowered for a CUDA target in bfloat16 they
call ``__cudnn$fmha`` with their padding masks, causal masks, sliding windows, grouped-query heads
and relative-position biases; lowered for this CPU they do not.

There is no GPU here: the cuDNN version and compute-capability probes (which need one) are
stubbed, as a CUDA 12 / cuDNN 9.10 H100 reports, and the backend is reported as "gpu" where the
default ("auto") selection is under test. Params are shapes only (nothing is run).
"""

import jax
import jax.numpy as jnp
import pytest
import transformers

from align_jax.encoders import attention as attention_lib
from align_jax.encoders import bert, decoder, t5

B, T = 2, 10
BERT = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)
LLM = dict(vocab_size=101, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {  # name: (family module, transformers config, build kwargs)
    "bert": (bert, transformers.BertConfig(**BERT), {}),
    "mpnet (relative bias)": (bert, transformers.MPNetConfig(**BERT), {}),
    "clip text (causal)": (bert, transformers.CLIPTextConfig(**BERT), {}),
    "llama (causal, GQA)": (decoder, transformers.LlamaConfig(**LLM), {}),
    "mistral (sliding window)": (decoder, transformers.MistralConfig(**LLM, sliding_window=4), {}),
    "qwen3 bidirectional": (decoder, transformers.Qwen3Config(**LLM, head_dim=16),
                            {"bidirectional": True}),
    "t5 (relative bias)": (t5, transformers.T5Config(
        vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2), {}),
}


def _lowered(family, config, platform, **kwargs):
  cfg = family.read_config(config.to_dict())
  module = family.build(cfg, jnp.bfloat16, **kwargs)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                        family.abstract_params(cfg))
  ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
  mask = jax.ShapeDtypeStruct((B, T), jnp.int32)  # padding, left or right: a traced mask
  traced = jax.jit(module.apply).trace({"params": params}, ids, mask)
  return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.fixture
def cuda_probes(monkeypatch):
  from jax._src.cudnn import fused_attention_stablehlo as fused
  monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)


@pytest.mark.parametrize("name", CONFIGS)
def test_text_towers_lower_to_cudnn_on_a_gpu_and_xla_on_cpu(name, cuda_probes, monkeypatch):
  family, config, kwargs = CONFIGS[name]
  assert "cudnn" not in _lowered(family, config, "cpu", **kwargs)  # "auto" on a CPU backend
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # "auto" (the default) on a GPU
  gpu_text = _lowered(family, config, "cuda", **kwargs)
  # one fused call in the scanned block (lowered once whatever the depth)
  assert gpu_text.count("__cudnn$fmha") >= 1, name
  assert gpu_text.count("__cudnn$fmha") == _lowered(
      family, config, "cuda", attention_implementation="cudnn", **kwargs).count("__cudnn$fmha")


def test_auto_takes_xla_where_cudnn_cannot_run(cuda_probes, monkeypatch):
  """float32 towers, and head widths cuDNN refuses, stay on XLA under "auto" on a GPU."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention_lib.auto_implementation(jnp.bfloat16, 64) == "cudnn"
  assert attention_lib.auto_implementation(jnp.float32, 64) is None
  assert attention_lib.auto_implementation(jnp.bfloat16, 12) is None  # not a multiple of 8
  assert attention_lib.auto_implementation(jnp.bfloat16, 256) is None  # over 128 (pre-Hopper)
  assert attention_lib.auto_implementation(jnp.bfloat16, 64, "cpu") is None
  family, config, _ = CONFIGS["llama (causal, GQA)"]
  wide = transformers.LlamaConfig(**{**LLM, "hidden_size": 48, "num_attention_heads": 4})
  assert "cudnn" not in _lowered(family, wide, "cuda")  # head width 12


def test_cudnn_mask_spans_queries_and_keys(cuda_probes):
  """A [B, S] key padding mask reaches cuDNN as a [B, 1, T, S] bias (its only mask form that
  allows left padding); the attention call itself, lowered for CUDA."""
  q = jax.ShapeDtypeStruct((B, T, 4, 16), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, T, 2, 16), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((B, T), jnp.bool_)
  fn = lambda q, k, v, m: attention_lib.attention(q, k, v, mask=m, causal=True,
                                                  implementation="cudnn")
  text = jax.jit(fn).trace(q, kv, kv, mask).lower(lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "__cudnn$fmha" in line]
  assert len(calls) == 1 and f"tensor<{B}x1x{T}x{T}xbf16>" in calls[0], calls
