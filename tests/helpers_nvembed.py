"""NV-Embed-v2's pooler written out step by step in PyTorch: the tests' reference for
align_jax/encoders/nvembed.py (NV-Embed's own model class is hub remote code, not in
transformers).

Read from the public modeling_nvembed.py: on the Mistral's last hidden states h, a cross-attention
from the tokens to learned latents (pre-norm on both sides, no mask), a pre-norm GEGLU
feed-forward, each added to h, then the mean over the pool mask and L2 normalisation.
"""

import numpy as np

PREFIX = "latent_attention_model."


def torch_latent_pooler(torch, state, hidden, pool_mask, heads, normalize=True):
  """[B, D] numpy: the pooler of ``state`` (PyTorch-named, ``latent_attention_model.*``) on
  ``hidden`` [B, T, D] (numpy) over ``pool_mask`` [B, T]."""
  import torch.nn.functional as F
  sd = {k[len(PREFIX):]: torch.from_numpy(np.array(v, np.float32))
        for k, v in state.items() if k.startswith(PREFIX)}
  a, f = "cross_attend_blocks.0.", "cross_attend_blocks.1."
  width = hidden.shape[-1]

  def ln(x, name):
    return F.layer_norm(x, (width,), sd[name + ".weight"], sd[name + ".bias"])

  h = torch.from_numpy(np.asarray(hidden, np.float32))
  latents = sd["latents"]
  q = ln(h, a + "norm") @ sd[a + "fn.to_q.weight"].T
  k, v = (ln(latents, a + "norm_context") @ sd[a + "fn.to_kv.weight"].T).chunk(2, dim=-1)
  b, t, n = h.shape[0], h.shape[1], latents.shape[0]
  q = q.view(b, t, heads, -1).transpose(1, 2)
  k = k.view(1, n, heads, -1).transpose(1, 2).expand(b, -1, -1, -1)
  v = v.view(1, n, heads, -1).transpose(1, 2).expand(b, -1, -1, -1)
  out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
  h = h + out @ sd[a + "fn.to_out.weight"].T
  x, gate = (ln(h, f + "norm") @ sd[f + "fn.net.0.weight"].T + sd[f + "fn.net.0.bias"]).chunk(2, -1)
  h = h + (x * F.gelu(gate)) @ sd[f + "fn.net.2.weight"].T + sd[f + "fn.net.2.bias"]
  m = torch.from_numpy(np.asarray(pool_mask)).float()[..., None]
  pooled = (h * m).sum(1) / m.sum(1)
  return (F.normalize(pooled, p=2, dim=-1) if normalize else pooled).numpy()


def torch_bidirectional_mistral(torch, state, text_config, ids, mask):
  """Last hidden states [B, T, D] of the ``embedding_model.*`` Mistral of ``state``, run by
  transformers' PyTorch MistralModel with a padding-only (bidirectional) 4-D mask, as NV-Embed's
  ``BidirectionalMistralModel``; position ids 0.. over real tokens (right padding)."""
  import transformers
  config = transformers.MistralConfig(**{k: v for k, v in text_config.items()
                                         if k != "model_type"})
  model = transformers.MistralModel(config)
  model.config._attn_implementation = "eager"
  sd = {k[len("embedding_model."):]: torch.from_numpy(np.array(v, np.float32))
        for k, v in state.items() if k.startswith("embedding_model.")}
  model.load_state_dict(sd)
  model.eval()
  allowed = mask[:, None, None, :].astype(bool).repeat(ids.shape[1], axis=2)
  additive = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)
  positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(np.asarray(ids)).long(),
                attention_mask=torch.from_numpy(additive),
                position_ids=torch.from_numpy(positions).long())
  return out.last_hidden_state.numpy()
