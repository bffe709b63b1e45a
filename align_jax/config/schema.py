"""The configuration schema: every key a training run understands, with its default.

Config files in ``configs/`` start from :func:`default_config` and change what they need. The
returned ConfigDict is *locked*, so a misspelt key in a config file or on the command line
(``--config.batchsize=8``) raises at once with the list of valid keys, instead of being silently
ignored. :func:`validate` then checks the values against each other and the device mesh, and names
the fix for each problem.
"""

from __future__ import annotations

import ml_collections


LOSSES = ("softmax", "sigmoid")
# config.data.source: arrays (align_jax.data.features) or raw images + captions (data.pipeline)
SOURCES = ("synthetic", "features", "tfds", "webdataset", "manifest", "parquet",
           "synthetic_shapes")
VERIFY_FEATURES = ("once", "always", "size")
STORE_DTYPES = ("float16", "float32")


def default_config() -> ml_collections.ConfigDict:
  """Returns the locked base config; the freeze-align recipe's optimiser settings are the defaults."""
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
  # synthetic | features (arrays: align_jax.data.features); tfds | webdataset | manifest |
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
  # "size" (shapes and sizes only; align_jax.data.feature_files)
  c.data.verify_features = "once"
  c.data.feature_cache_dir = ""  # verified-digest cache and local copies of gs:// stores
  # features source: the store's fingerprint, recorded by the trainer in WORKDIR/config.json; a
  # resume on a store with another one is refused (align_jax.train.extract.check_training_store)
  c.data.store_fingerprint = ml_collections.FieldReference(None, field_type=object)
  # features / synthetic sources: shuffle blocks of this many consecutive pairs (1 = every pair
  # independently). 16 reads pooled stores ~2x faster (contiguous rows); the pairs of one block
  # then always share a batch, so keep 1 for stores written in a correlated order
  # (align_jax.data.order)
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
  # one of them positive (align_jax.objectives.variants: SAIL's multi-positive sigmoid,
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
  # a threefry key; each step's key is turned into one of this implementation. "rbg" is faster than
  # threefry2x32 on CPU/GPU/TPU; masks then depend on the mesh (same mesh: exact resume)
  c.model.dropout_rng_impl = "rbg"
  # FuseMix (align_jax.objectives.variants.fusemix): mixup of the frozen features, λ ~ Beta(α, α); 0
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
  # align_jax.objectives.variants: CWCL soft targets (softmax loss; 0 = off, 1 = the paper's loss)
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
  c.lock()
  c.evals.unlock()
  return c



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


def _choice_problems(config: ml_collections.ConfigDict) -> list[str]:
  problems = []
  for key, choices in (("data.source", SOURCES), ("loss.name", LOSSES),
                       ("data.verify_features", VERIFY_FEATURES),
                       ("extract.dtype", STORE_DTYPES)):
    block, leaf = key.split(".")
    value = config[block][leaf]
    if value not in choices:
      what = {"data.source": "data source", "loss.name": "loss"}.get(key, key)
      problems.append(f"unknown {what} {value!r}: set --config.{key} to one of "
                      f"{', '.join(repr(c) for c in choices)}")
  return problems


def check_choices(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line) if a key with a fixed set of values has another one.

  Needs no devices, so ``main.py`` runs it for every mode before anything is built.
  """
  problems = _choice_problems(config)
  if problems:
    raise ValueError("; ".join(problems))


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


def _initials(name: str) -> str:
  return "".join(word[0] for word in name.split("_") if word)


def _close_match(word: str, candidates: list[str]) -> str | None:
  """A misspelling (difflib) or initials (``lr`` -> ``learning_rate``) of one candidate."""
  import difflib
  if len(word) >= 2:
    by_initials = [c for c in candidates if "_" in c and _initials(c) == word.lower()]
    if len(by_initials) == 1:
      return by_initials[0]
  close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
  return close[0] if close else None


def _abbreviation_of(word: str, candidates: list[str]) -> str | None:
  """The shortest candidate with the same first letter and ``word``'s letters in order."""
  def is_subsequence(short, long):
    letters = iter(long)
    return all(ch in letters for ch in short)
  if len(word) < 2:
    return None
  found = sorted((c for c in candidates if c[0] == word[0] and
                  is_subsequence(word.lower(), c.lower())), key=len)
  return found[0] if found else None


def suggest_key(path: str) -> str | None:
  """The existing dotted key closest to an unknown one: ``optim.lr`` -> ``optim.learning_rate``,
  ``batchsize`` -> ``batch_size``, ``lr`` -> ``optim.learning_rate`` (searched in every block)."""
  node, prefix = default_config(), []
  parts = path.split(".")
  for part in parts[:-1]:
    if part in node and isinstance(node[part], ml_collections.ConfigDict):
      node, prefix = node[part], prefix + [part]
    else:
      break
  leaf = parts[len(prefix)]
  local = list(node.keys())
  everywhere = {}
  for block, value in default_config().items():
    if isinstance(value, ml_collections.ConfigDict):
      for key in value.keys():
        everywhere.setdefault(key, f"{block}.{key}")
  for finder in (_close_match, _abbreviation_of):
    match = finder(leaf, local)
    if match is not None:
      return ".".join(prefix + [match])
    match = finder(leaf, list(everywhere))
    if match is not None:
      return everywhere[match]
  return None


def block_path(node: ml_collections.ConfigDict) -> str | None:
  """The dotted path of a block of the schema, recognised by its keys ("" for the root)."""
  keys = set(node.keys())
  default = default_config()
  if keys == set(default.keys()):
    return ""
  for name, value in default.items():
    if isinstance(value, ml_collections.ConfigDict) and name != "evals" and (
        set(value.keys()) == keys):
      return name
  return None


def validate(config: ml_collections.ConfigDict, num_batch_devices: int, num_processes: int = 1):
  """Checks values against each other and the mesh; raises ValueError naming the fix.

  ``num_batch_devices`` is how many ways the mesh splits the batch (``sharding.num_batch_shards``:
  the batch axes' sizes, ICI x DCN on a multi-slice mesh).
  """
  problems = _choice_problems(config)
  for key in ("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
    if config[key] <= 0:
      problems.append(f"{key} must be positive (got {config[key]}): set --config.{key}=N")
  if config.keep_checkpoints is not None and config.keep_checkpoints < 1:
    problems.append(f"keep_checkpoints must be >= 1 (got {config.keep_checkpoints}): retention "
                    "always keeps the newest checkpoint; set --config.keep_checkpoints=N")
  if config.batch_size % num_batch_devices:
    nearest = max(num_batch_devices, config.batch_size // num_batch_devices * num_batch_devices)
    problems.append(
        f"batch_size {config.batch_size} is not divisible by the {num_batch_devices} devices "
        f"that split the batch (mesh axes {tuple(config.mesh.batch_axes)}); use a multiple of "
        f"{num_batch_devices}, e.g. --config.batch_size={nearest}")
  if config.batch_size % num_processes:
    problems.append(f"batch_size {config.batch_size} is not divisible by the {num_processes} "
                    "processes; use a multiple of the process count")
  if not 0 < config.loss.temperature_min <= config.loss.temperature_init <= (
      config.loss.temperature_max):
    problems.append("need 0 < loss.temperature_min <= loss.temperature_init <= "
                    "loss.temperature_max")
  if not config.optim.learning_rate > 0:
    problems.append(f"optim.learning_rate must be > 0 (got {config.optim.learning_rate}): set "
                    "--config.optim.learning_rate, e.g. 1e-3 (the default)")
  if config.optim.warmup_steps < 0:
    problems.append("optim.warmup_steps must be >= 0")
  dcn_shape, axes = tuple(config.mesh.dcn_shape), tuple(config.mesh.axes)
  if dcn_shape and (len(dcn_shape) != len(axes) or dcn_shape.count(-1) > 1
                    or any(s < 1 and s != -1 for s in dcn_shape)):
    example = (2,) + (1,) * (len(axes) - 1)
    problems.append(f"mesh.dcn_shape {dcn_shape} must be () or one positive size (at most one -1) "
                    f"per mesh axis {axes}, e.g. --config.mesh.dcn_shape='{example}' for 2 slices "
                    f"along {axes[0]!r}")
  problems += _variant_problems(config)
  for name, evaluator in config.evals.items():
    if "type" not in evaluator:
      problems.append(f"evaluator {name!r} has no type: set config.evals.{name}.type")
  if problems:
    raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))


def _variant_problems(config: ml_collections.ConfigDict) -> list[str]:
  """align_jax.objectives.variants' config problems, one line each naming the key and the fix."""
  problems = []
  m, d, l = config.model, config.data, config.loss
  if m.fusemix_alpha < 0:
    problems.append(f"model.fusemix_alpha must be >= 0 (0 = off; got {m.fusemix_alpha})")
  if m.fusemix_alpha > 0 and "tokens" in (m.image_pooling, m.text_pooling):
    problems.append("model.fusemix_alpha needs pooled features: set model.image_pooling / "
                    "model.text_pooling to cls or mean (not tokens), or model.fusemix_alpha=0")
  if d.shuffle_block_rows < 1:
    problems.append(f"data.shuffle_block_rows must be >= 1 (got {d.shuffle_block_rows})")
  if d.captions_per_image < 1 or d.num_captions < 1:
    problems.append(f"data.captions_per_image and data.num_captions must be >= 1 (got "
                    f"{d.captions_per_image}, {d.num_captions})")
  if not 0 <= l.cwcl_weight <= 1:
    problems.append(f"loss.cwcl_weight must be in [0, 1] (0 = off, 1 = CWCL; got {l.cwcl_weight})")
  if l.cwcl_weight > 0 and l.name != "softmax":
    problems.append("loss.cwcl_weight is for the softmax loss: set loss.name=softmax or "
                    "loss.cwcl_weight=0")
  if l.cwcl_weight > 0 and d.captions_per_image > 1:
    problems.append("loss.cwcl_weight and data.captions_per_image > 1 cannot be combined: "
                    "set one of them off")
  if (d.captions_per_image > 1 or l.cwcl_weight > 0) and l.impl == "blockwise":
    problems.append("data.captions_per_image > 1 and loss.cwcl_weight use a gathered loss: set "
                    "loss.impl=gathered (or leave it empty)")
  if l.structure_weight < 0:
    problems.append(f"loss.structure_weight must be >= 0 (0 = off; got {l.structure_weight})")
  if l.structure_levels < 1 or l.structure_temperature <= 0:
    problems.append("loss.structure_levels must be >= 1 and loss.structure_temperature > 0")
  return problems

