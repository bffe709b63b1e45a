"""The configuration schema: every key a training run understands, with its default.

Config files in ``configs/`` start from :func:`default_config` and change what they need. The
returned ConfigDict is *locked*, so a misspelt key (``config.batchsize = 8``) raises at once
instead of being silently added. The command line loads ``--config`` files inside
:func:`built_unlocked` and then compares the whole tree with the schema (:func:`unknown_keys`), so
it can name every unknown key by its full dotted path and the file's line
(:mod:`align_jax.config.errors`). The values are checked against each other and the device mesh by
:mod:`align_jax.config.checks`, with the checks each package registers.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import ml_collections


# False inside built_unlocked(): default_config() then returns an unlocked ConfigDict
_LOCKED = contextvars.ContextVar("align_jax_config_schema_locked", default=True)


def default_config() -> ml_collections.ConfigDict:
  """Returns the locked base config (unlocked inside :func:`built_unlocked`); the freeze-align
  recipe's optimiser settings are the defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 1024  # global, over all devices and processes
  c.log_every = 50
  c.eval_every = 500
  c.eval_at_start = False  # also evaluate before the first step of a fresh run
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  # persistent XLA compilation cache, a folder or gs:// URL ("" = off): a restart (preemption,
  # resume) loads the compiled train step instead of compiling it
  # (align_jax.train.compilation_cache)
  c.compilation_cache_dir = ""

  c.data = ml_collections.ConfigDict()
  # synthetic | features (arrays: align_jax.data.array_sources); tfds | webdataset | manifest |
  # parquet | synthetic_shapes (raw images + captions: align_jax.data.pipeline)
  c.data.source = "synthetic"
  c.data.split = "train"  # evaluators override it (e.g. "heldout", "validation")
  c.data.path = ""  # stored-features folder, a .jsonl/.csv manifest, or Parquet files/folder/glob
  c.data.name = ""  # tfds builder name, e.g. "coco_captions"
  c.data.data_dir = ""  # tfds data_dir
  c.data.urls = ""  # webdataset shards: paths, globs or brace lists
  c.data.index_cache_dir = ""  # webdataset: folder of the tar indexes ("" = a private user cache)
  c.data.image_root = ""  # manifest / parquet: folder the image paths are relative to
  c.data.image_key = "image"  # parquet: a column of bytes, {"bytes", "path"} structs or paths
  c.data.caption_key = ""  # "" = the reader's default (tfds: captions/text; others: caption)
  c.data.crop_scale = (0.2, 1.0)  # RandomResizedCrop area range (training)
  c.data.flip = True  # random horizontal flips (training)
  c.data.randaugment = False  # RandAugment(2, 7) on top of RandomResizedCrop + flip
  c.data.num_workers = 0  # grain worker processes for decode + augment (0: threads only)
  c.data.num_threads = 4
  c.data.prefetch = 32
  c.data.max_image_pixels = 89_478_485  # larger images are skipped (decompression bombs)
  c.data.min_image_size = 8
  c.data.max_consecutive_skips = 0  # 0 = min(records, 10,000): then the source is broken
  # features source: sha256 of every shard file checked "once" per machine (cached), "always", or
  # "size" (shapes and sizes only; align_jax.data.feature_store)
  c.data.verify_features = "once"
  c.data.feature_cache_dir = ""  # verified-digest cache and local copies of gs:// stores
  # features source: the store's fingerprint, recorded by the trainer in WORKDIR/config.json; a
  # resume on a store with another one is refused (align_jax.train.extract.check_training_store)
  c.data.store_fingerprint = ml_collections.FieldReference(None, field_type=object)
  # features / synthetic sources: shuffle blocks of this many consecutive pairs (1 = every pair
  # independently). Larger blocks read pooled stores faster (contiguous rows; benchmarks/README.md,
  # "Stored-feature loader speed"); the pairs of one block then always share a batch, so keep 1
  # for stores written in a correlated order (align_jax.data.order)
  c.data.shuffle_block_rows = 1
  # synthetic source: a shared latent seen through two different fixed nonlinear views
  c.data.num_pairs = 8192
  c.data.num_heldout = 1000
  c.data.latent_dim = 16
  c.data.image_input_dim = 64
  c.data.text_input_dim = 48
  c.data.noise = 0.05
  c.data.data_seed = 1234  # the synthetic world; fixed so every run sees the same data
  c.data.num_captions = 1  # synthetic source: noisy text views (captions) per latent
  # captions of each image in a training batch (text rows [B * k], image-major); > 1 labels every
  # one of them positive (align_jax.objectives.multi_positive: SAIL's multi-positive sigmoid,
  # multi-positive softmax)
  c.data.captions_per_image = 1

  c.model = ml_collections.ConfigDict()
  # frozen encoders: a Hugging Face id or local folder (align_jax.encoders), "features" (the batch
  # already holds encoder outputs), or "random_mlp" (the demo's fixed random networks)
  c.model.image_encoder = "features"
  c.model.text_encoder = "features"
  # recorded by the trainer in WORKDIR/config.json: the hub commit each encoder id resolved to
  # ("" for a local folder or a toy encoder); align_jax.model.two_tower.AlignModel.encoder_revisions
  c.model.image_encoder_revision = ""
  c.model.text_encoder_revision = ""
  c.model.image_pooling = "cls"  # cls | mean | cls+mean_patch | tokens
  c.model.text_pooling = "mean"  # cls | mean | last (decoder LLMs) | tokens | latent (NV-Embed)
  c.model.image_size = 0  # 0: the checkpoint's own resolution
  # which hidden layer each encoder's features come from (align_jax.encoders.layers): an index,
  # -1 = the final output after the encoder's final norm (default), 0 = embeddings, k = HF's
  # hidden_states[k] (negative: from the end); or a list/tuple of indices, averaged
  c.model.image_layer = ml_collections.FieldReference(-1, field_type=object)
  c.model.text_layer = ml_collections.FieldReference(-1, field_type=object)
  c.model.text_prefix = ""  # put before every text (an embedder's instruction, e.g. E5-Mistral)
  c.model.max_text_length = 77
  c.model.encoder_dtype = "float32"  # or bfloat16
  c.model.encoder_micro_batch = 0  # rows per device per encoder call inside the step; 0 = all
  # rows per device per projector call, recomputed in the backward pass (flat activation memory
  # for the token projectors); 0 = the whole batch at once
  c.model.projector_micro_batch = 0
  c.model.encoder_width = 256
  c.model.encoder_output_dim = 128
  c.model.image_projector = "mlp"  # see align_jax.model.projectors.PROJECTORS
  c.model.text_projector = "mlp"
  c.model.embed_dim = 512
  c.model.hidden_dim = 1024  # mlp projector
  c.model.glu_hidden_mult = 8  # glu projector: hidden = mult * input width (SAIL)
  c.model.dropout = 0.1
  # compute dtype of the trainable projectors: float32, or bfloat16 (mixed precision: parameters,
  # gradients, optimiser state and the loss stay float32)
  c.model.projector_dtype = "float32"
  # PRNG for the dropout masks (align_jax.model.two_tower.DROPOUT_RNG_IMPLS): the state's key stays
  # a threefry key; each step's key is turned into one of this implementation. "rbg" draws masks
  # faster than threefry2x32 (benchmarks/README.md, "Train step on stored features vs PyTorch");
  # masks then depend on the mesh (same mesh: exact resume)
  c.model.dropout_rng_impl = "rbg"
  # FuseMix (align_jax.train.fusemix): mixup of the frozen features, λ ~ Beta(α, α); 0
  # = off
  c.model.fusemix_alpha = 0.0

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
  c.loss.impl = ""  # "" = align_jax.objectives.contrastive.DEFAULT_IMPL; or gathered | blockwise
  c.loss.block_size = 0  # blockwise impl; 0 = the implementation's default
  c.loss.temperature_init = 0.07
  c.loss.temperature_min = 0.001
  c.loss.temperature_max = 0.5
  c.loss.scale_init = 10.0
  c.loss.scale_max = 100.0
  c.loss.bias_init = -10.0
  # align_jax.objectives.cwcl / .structure: CWCL soft targets (softmax loss; 0 = off, 1 = the paper's loss)
  # and the STRUCTURE regulariser (weight 0 = off; hierarchy levels; similarity temperature)
  c.loss.cwcl_weight = 0.0
  c.loss.structure_weight = 0.0
  c.loss.structure_levels = 1
  c.loss.structure_temperature = 0.07

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3
  c.optim.end_learning_rate = 1e-5
  c.optim.warmup_steps = 1000
  c.optim.weight_decay = 0.02
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = 1.0  # 0 disables clipping

  # --mode=extract_features (align_jax.train.extract)
  c.extract = ml_collections.ConfigDict()
  # delete a feature store already in --workdir (whatever it holds) and extract from scratch;
  # without it, a store extracted with other encoders/settings/data is refused
  c.extract.overwrite = False
  c.extract.dtype = "float16"  # storage dtype: float16 | float32
  c.extract.shard_batches = 16  # global batches per shard (the resume granularity)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ("data",)
  c.mesh.shape = (-1,)  # -1: all remaining devices (of one slice, on a multi-slice mesh)
  # Multi-slice (DCN) mesh: the mesh of slices over the same axes (e.g. (2,) for 2 slices along
  # "data"); each axis is shape * dcn_shape long. Slices: TPU slice_index, else processes. () =
  # one slice, or on multi-slice TPU all slices along the first batch axis
  # (align_jax.parallel.mesh).
  c.mesh.dcn_shape = ()
  c.mesh.batch_axes = ("data",)  # mesh axes the batch dimension is split over
  # (regex over "/"-joined parameter paths, partition spec as a tuple of axis names or None);
  # first match wins, unmatched parameters are replicated.
  c.mesh.param_rules = ()
  c.mesh.frozen_param_rules = ()

  # Evaluators by name: each a ConfigDict with type (retrieval), every (steps; 0 = eval_every),
  # prefix (metric key prefix) and the evaluator's own keys. Free-form, so not locked.
  c.evals = ml_collections.ConfigDict()
  return lock(c) if _LOCKED.get() else c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks ``config`` as :func:`default_config` does: every block but the free-form ``evals``."""
  config.lock()
  config.evals.unlock()
  return config


@contextlib.contextmanager
def built_unlocked() -> Iterator[None]:
  """Inside, :func:`default_config` (and every config file built on it) returns an unlocked dict.

  A locked dict raises inside the config file at the first unknown key, where only the leaf name
  (``lr``) is known; finding its block would mean reading the file's stack frames. Built unlocked,
  the file runs to the end, and the loader (``align_jax.cli.train``) compares the result with the
  schema (:func:`unknown_keys`), which names every unknown key by its full dotted path, then locks
  it (:func:`lock`). Outside, library and notebook users keep the locked dict that raises at once.
  """
  token = _LOCKED.set(False)
  try:
    yield
  finally:
    _LOCKED.reset(token)



def pod_recipe_config(total_steps: int, batch_size: int) -> ml_collections.ConfigDict:
  """:func:`default_config` with what the pod recipes in configs/ share: the schedule (log every
  50 steps, evaluate and save every 1,000) and WebDataset shards read by 16 workers
  (``--config.data.urls`` is given on the command line)."""
  config = default_config()
  config.total_steps = total_steps
  config.batch_size = batch_size
  config.log_every = 50
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.data.source = "webdataset"
  config.data.urls = ""  # required: --config.data.urls=...
  config.data.num_workers = 16
  return config


# SAIL's GLU heads' wide dimension (8 x the input width) split over the data axis, in the params
# and the optimiser state alike (config.mesh.param_rules of the 7B-text-tower recipes).
SAIL_GLU_PARAM_RULES = (
    (r"/(gate|value)/kernel$", (None, "data")),
    (r"/(gate|value)/bias$", ("data",)),
    (r"/out/kernel$", ("data", None)),
)


def use_frozen_encoders(config: ml_collections.ConfigDict, variant: ml_collections.ConfigDict,
                        image_pooling: str) -> None:
  """The frozen towers of a pod recipe from its variant (``image``, ``size``, ``text``,
  ``pooling``, ``length``, ``micro``): hub ids or folders, run in bfloat16 in micro-batches."""
  m = config.model
  m.image_encoder, m.image_size, m.image_pooling = variant.image, variant.size, image_pooling
  m.text_encoder, m.text_pooling = variant.text, variant.pooling
  m.max_text_length = variant.length
  m.encoder_dtype = "bfloat16"
  m.encoder_micro_batch = variant.micro


def use_sail_heads(config: ml_collections.ConfigDict) -> None:
  """SAIL's trainable side on ``config`` (RECIPES section 2): GLU projectors (8x wide, 1,024-d
  embeddings, no dropout), the sigmoid loss (scale 20 capped at 100, bias -10), and AdamW 1e-3
  decaying to 1e-5 after 1,000 warm-up steps, weight decay 0.02."""
  m = config.model
  m.image_projector = m.text_projector = "glu"
  m.glu_hidden_mult = 8
  m.embed_dim = 1024
  m.dropout = 0.0
  config.loss.name = "sigmoid"
  config.loss.scale_init = 20.0
  config.loss.scale_max = 100.0
  config.loss.bias_init = -10.0
  config.optim.learning_rate = 1e-3
  config.optim.end_learning_rate = 1e-5
  config.optim.warmup_steps = 1000
  config.optim.weight_decay = 0.02


def coco_retrieval_eval() -> dict:
  """The pod recipes' evaluator: COCO 5k (Karpathy test, TFDS ``coco_captions``) image<->text
  recall@1/5/10, at the end of the run (``every=0``)."""
  return dict(type="retrieval", every=0, batch_size=1024, ks=(1, 5, 10),
              data=dict(source="tfds", name="coco_captions", split="test", num_workers=8))

def parse_arg(arg: str | None, **defaults):
  """Parses a config variant string such as ``"steps=10,loss=sigmoid"`` (the part after ``:``).

  Each value is converted to the type of its default; an unknown name raises with the valid ones.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    if not item.strip():
      continue
    name, sep, value = item.partition("=")
    name = name.strip()
    if name not in defaults:
      raise ValueError(
          f"unknown config variant {name!r} in {arg!r}; valid variants: {sorted(defaults)}")
    default = defaults[name]
    if not sep:
      value = "true" if isinstance(default, bool) else value
    if isinstance(default, bool):
      result[name] = value.strip().lower() in ("1", "true", "yes")
    else:
      result[name] = type(default)(value.strip())
  return result


def key_exists(path: str) -> bool:
  """Whether a dotted key (``"optim.learning_rate"``) is in the schema; ``evals.*`` is free-form."""
  node = default_config()
  for i, part in enumerate(path.split(".")):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    if path.split(".")[:i + 1] == ["evals"]:
      return True
    node = node[part]
  return True




def unknown_keys(config: ml_collections.ConfigDict) -> list[str]:
  """The dotted keys set in ``config`` that the schema lacks, sorted (``evals.*`` is free-form;
  below an unknown key nothing more is listed)."""
  found = []

  def walk(node, schema, prefix):
    for key in node.keys():
      path = prefix + key
      if key not in schema:
        found.append(path)
      elif (path != "evals" and isinstance(node[key], ml_collections.ConfigDict)
            and isinstance(schema[key], ml_collections.ConfigDict)):
        walk(node[key], schema[key], path + ".")

  walk(config, default_config(), "")
  return sorted(found)
