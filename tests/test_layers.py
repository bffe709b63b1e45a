"""``model.image_layer`` / ``model.text_layer``: any hidden layer (or an average), not the last.

Against PyTorch's ``output_hidden_states`` on tiny random checkpoints: index k < N is HF's
``hidden_states[k]``; -1 (= N) is the final output after the family's final norm, bit-identical to
the default path (DINOv2's and CLIP's ``hidden_states[-1]`` is *before* that norm, so it differs);
a list averages layers; the config keys reach the encoders of online training.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from align_jax import encoders
from align_jax.model import two_tower as model_lib
from align_jax.encoders import layers as layers_lib
from align_jax.testing import tiny_checkpoints as tiny
from train_utils import tiny_config

TOL = 1e-4
TEXTS = ["a cat", "That is a happy zebra!", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, torch):
  root = tmp_path_factory.mktemp("layer_models")
  return {"dinov2": tiny.make_tiny_dinov2(str(root / "dinov2")),
          "clip": tiny.make_tiny_clip(str(root / "clip")),
          "bert": tiny.make_tiny_bert(str(root / "bert")),
          "llama": tiny.make_tiny_llama(str(root / "llama"))}


def _pixels(encoder):
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
  return encoder.preprocess(images)


def _torch_image_states(torch, folder, family, pixels):
  import transformers
  x = torch.from_numpy(np.ascontiguousarray(pixels["pixel_values"].transpose(0, 3, 1, 2)))
  with torch.no_grad():
    if family == "clip":
      model = transformers.CLIPModel.from_pretrained(folder).eval().vision_model
      out = model(pixel_values=x, output_hidden_states=True)
      final = model.post_layernorm(out.last_hidden_state)
    else:
      out = transformers.Dinov2Model.from_pretrained(folder).eval()(pixel_values=x,
                                                                    output_hidden_states=True)
      final = out.last_hidden_state
  return [h.numpy() for h in out.hidden_states], final.numpy()


@pytest.mark.parametrize("family", ["dinov2", "clip"])
def test_image_layers_match_pytorch_hidden_states(checkpoints, torch, family):
  folder = checkpoints[family]
  default = encoders.ImageEncoder.from_pretrained(folder, pooling="tokens")
  pixels = _pixels(default)
  hidden, final = _torch_image_states(torch, folder, family, pixels)
  assert len(hidden) == 3  # embeddings + 2 blocks
  base = np.asarray(default.apply(default.params, pixels)["tokens"])
  last = encoders.ImageEncoder.from_pretrained(folder, pooling="tokens", layer=2)
  np.testing.assert_array_equal(last.apply(last.params, pixels)["tokens"], base)  # 2 == -1
  np.testing.assert_allclose(base, final, atol=TOL)  # after the final LayerNorm ...
  assert np.max(np.abs(base - hidden[-1])) > 0.1  # ... so not HF's hidden_states[-1]
  for layer in (0, 1, -2, -3):
    enc = encoders.ImageEncoder.from_pretrained(folder, pooling="tokens", layer=layer)
    np.testing.assert_allclose(enc.apply(enc.params, pixels)["tokens"], hidden[layer % 3],
                               atol=TOL)
  both = encoders.ImageEncoder.from_pretrained(folder, pooling="cls+mean_patch", layer=(1, -1))
  tokens = (hidden[1] + final) / 2
  expected = np.concatenate([tokens[:, 0], tokens[:, 1:].mean(1)], axis=-1)
  np.testing.assert_allclose(both.apply(both.params, pixels)["pooled"], expected, atol=TOL)
  stacked = default.apply_all_layers(default.params, pixels)  # the same numbering as layer=k
  for k in range(3):
    reference = final if k == 2 else hidden[k]
    np.testing.assert_allclose(stacked[k], reference[:, 1:].mean(1), atol=TOL)


def _torch_text_states(torch, folder, family, inputs):
  import transformers
  cls = {"bert": "BertModel", "clip": "CLIPModel", "llama": "LlamaModel"}[family]
  kwargs = {"attn_implementation": "eager"} if family == "llama" else {}
  model = getattr(transformers, cls).from_pretrained(folder, **kwargs).eval()
  if family == "clip":
    model = model.text_model
  mask = inputs["attention_mask"]
  extra = {}
  if family == "llama":
    extra["position_ids"] = torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0)).long()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(inputs["input_ids"]).long(),
                attention_mask=torch.from_numpy(mask).long(), output_hidden_states=True, **extra)
  return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


@pytest.mark.parametrize("family,pooling", [("bert", "mean"), ("clip", "cls"), ("llama", "last")])
def test_text_layers_match_pytorch_hidden_states(checkpoints, torch, family, pooling):
  folder = checkpoints[family]
  default = encoders.TextEncoder.from_pretrained(folder, pooling="tokens", max_length=12)
  inputs = default.preprocess(TEXTS)
  valid = inputs["attention_mask"].astype(bool)
  hidden, final = _torch_text_states(torch, folder, family, inputs)
  base = np.asarray(default.apply(default.params, inputs)["tokens"])
  minus_one = encoders.TextEncoder.from_pretrained(folder, pooling="tokens", max_length=12,
                                                   layer=-1)
  np.testing.assert_array_equal(minus_one.apply(minus_one.params, inputs)["tokens"], base)
  np.testing.assert_allclose(base[valid], final[valid], atol=TOL)
  # HF's hidden_states[-1] is the final output for BERT and the LLMs; CLIP's is before its norm.
  gap = np.max(np.abs(hidden[-1][valid] - final[valid]))
  assert (gap > 0.1) if family == "clip" else (gap < 1e-5)
  for layer in (0, 1):
    enc = encoders.TextEncoder.from_pretrained(folder, pooling="tokens", max_length=12,
                                               layer=layer)
    np.testing.assert_allclose(np.asarray(enc.apply(enc.params, inputs)["tokens"])[valid],
                               hidden[layer][valid], atol=TOL)
  pooled = encoders.TextEncoder.from_pretrained(folder, pooling=pooling, max_length=12,
                                                layer=[0, -2])
  tokens = (hidden[0] + hidden[1]) / 2
  if pooling == "mean":
    expected = (tokens * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
  else:
    index = (np.argmax(inputs["input_ids"] == pooled.config.eos_token_id, axis=1)
             if family == "clip" else np.array([np.nonzero(row)[0][-1] for row in valid]))
    expected = tokens[np.arange(len(TEXTS)), index]
  np.testing.assert_allclose(pooled.apply(pooled.params, inputs)["pooled"], expected, atol=TOL)
  stacked = default.apply_all_layers(default.params, inputs)
  mean_final = (final * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
  np.testing.assert_allclose(stacked[-1], mean_final, atol=TOL)  # = layer -1, CLIP's norm too


def test_bad_layer_specs_raise_naming_the_config_key(checkpoints):
  with pytest.raises(ValueError, match=r"--config.model.image_layer=5: layer 5 does not exist; "
                                       r"this encoder has layers 0..2"):
    encoders.ImageEncoder.from_pretrained(checkpoints["dinov2"], layer=5)
  with pytest.raises(ValueError, match="--config.model.text_layer.*names a layer twice"):
    encoders.TextEncoder.from_pretrained(checkpoints["bert"], max_length=12, layer=(2, -1))
  with pytest.raises(ValueError, match="must be a layer index or a non-empty list"):
    encoders.TextEncoder.from_pretrained(checkpoints["bert"], max_length=12, layer="last")
  assert layers_lib.parse_layers((-1, 0), 2, "f") == (2, 0)
  assert layers_lib.parse_layers(-3, 2, "f") == (0,)
  for bad in ([], True, 1.0, -4, 3):
    with pytest.raises(ValueError):
      layers_lib.parse_layers(bad, 2, "f")


def test_config_layer_keys_reach_the_online_encoders(checkpoints):
  """``--config.model.image_layer`` / ``text_layer`` (int or tuple) and ``text_prefix``."""
  config = tiny_config(**{"model.image_encoder": checkpoints["dinov2"],
                          "model.text_encoder": checkpoints["llama"], "model.text_pooling": "last",
                          "model.image_pooling": "mean", "model.max_text_length": 12})
  config.model.image_layer = (0, -2)
  config.model.text_layer = 1
  config.model.text_prefix = "Query: "
  model = model_lib.build_model(config)
  assert model.image_encoder.layers == (0, 1) and model.text_encoder.layers == (1,)
  assert model.text_encoder.prefix == "Query: "
  text = encoders.TextEncoder.from_pretrained(checkpoints["llama"], pooling="last",
                                              max_length=12, layer=1)
  inputs = model.text_encoder.preprocess(["a cat"])
  np.testing.assert_array_equal(inputs["input_ids"], text.preprocess(["Query: a cat"])["input_ids"])
  frozen = model.frozen_params()
  _, features = model.encode(frozen, {"image": _pixels(model.image_encoder), "text": inputs})
  np.testing.assert_array_equal(features["pooled"], text.apply(text.params, inputs)["pooled"])
  assert features["pooled"].dtype == jnp.float32
