"""A tiny training config shared by the trainer tests (synthetic world, demo encoders)."""

from align_jax.config import schema as config_lib


def apply_overrides(config, overrides: dict) -> None:
  """Sets dotted keys (``{"model.dropout": 0.0}``) in ``config``, as ``--config.KEY=VALUE`` does."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value


def run_train_steps(config, mesh, n):
  """``n`` steps of the real trainer on ``mesh``: (trainer, losses, final state, frozen params
  copied to the host before the first step)."""
  import jax
  import numpy as np
  from align_jax.train import loop as train
  trainer = train.build_trainer(config, mesh)
  frozen_before = jax.tree.map(np.array, trainer.frozen)
  state, losses = trainer.state, []
  for _ in range(n):
    state, metrics = trainer.train_step(state, trainer.frozen, trainer.next_batch())
    losses.append(float(metrics["train/loss"]))
  return trainer, losses, state, frozen_before


# configs/demo.py shrunk to a seconds-long run: 512 synthetic pairs, small random-MLP encoders.
TINY_DEMO = {
    "batch_size": 64, "log_every": 2, "eval_every": 3, "checkpoint_every": 3,
    "async_checkpointing": False, "eval_at_start": False,
    "data.num_pairs": 512, "data.num_heldout": 64, "data.latent_dim": 8, "data.noise": 0.05,
    "data.image_input_dim": 12, "data.text_input_dim": 10,
    "model.encoder_width": 32, "model.encoder_output_dim": 24, "model.embed_dim": 16,
    "model.hidden_dim": 32, "model.dropout": 0.1,
    "optim.learning_rate": 1e-3, "optim.warmup_steps": 2,
    "evals.heldout.batch_size": 64, "evals.heldout.ks": (1, 5),
}


def tiny_config(**overrides):
  """configs/demo.py at 6 steps with :data:`TINY_DEMO`, then ``overrides``."""
  from configs import demo
  config = demo.get_config("steps=6")
  apply_overrides(config, TINY_DEMO)
  apply_overrides(config, overrides)
  return config


def tiny_online_config(root):
  """A config whose frozen encoders are tiny random HF Flax checkpoints written under ``root``."""
  from align_jax.data import synthetic_images
  from align_jax.testing import tiny_checkpoints as tiny
  image = tiny.make_tiny_dinov2(f"{root}/dinov2", image_size=16, patch_size=4, save_format="flax")
  text = tiny.make_tiny_bert(f"{root}/bert", save_format="flax",
                             corpus=[" ".join(synthetic_images.vocabulary())] * 4)
  config = tiny_config(**{
      "data.source": "synthetic_shapes", "data.num_pairs": 40, "batch_size": 16,
      "model.image_encoder": image, "model.text_encoder": text, "model.image_pooling": "tokens",
      "model.text_pooling": "tokens", "model.max_text_length": 12,
      "model.image_projector": "freeze_align_image", "model.text_projector": "freeze_align_text",
      "model.dropout": 0.0})
  config.evals = {}
  return config


def extract_small_shards(config, out, **kwargs):
  """``--mode=extract_features`` into ``out`` with one global batch per shard, float32."""
  from align_jax.train import extract as feature_store
  return feature_store.extract_features(config, str(out), shard_batches=1, dtype="float32",
                                        **kwargs)


def extract_interrupted_after_one_shard(config, out, monkeypatch) -> None:
  """An extraction into ``out`` that crashes while writing its second shard (one is complete)."""
  import pytest
  from align_jax.train import extract as feature_store
  flush, calls = feature_store._ShardWriter.flush, []

  def crash_on_second(self, index):
    calls.append(index)
    if len(calls) == 2:
      raise KeyboardInterrupt("simulated crash")
    return flush(self, index)

  monkeypatch.setattr(feature_store._ShardWriter, "flush", crash_on_second)
  with pytest.raises(KeyboardInterrupt):
    extract_small_shards(config, out)
  monkeypatch.setattr(feature_store._ShardWriter, "flush", flush)


def aligned_unit_pairs(b, d, seed=0):
  """``[b, d]`` unit-norm image and text rows with some alignment (row i of each is a pair), so a
  contrastive loss sees both positives and negatives matter; numpy float64."""
  import numpy as np
  rng = np.random.default_rng(seed)
  img = rng.normal(size=(b, d))
  txt = img + 1.5 * rng.normal(size=(b, d))
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  return norm(img), norm(txt)
