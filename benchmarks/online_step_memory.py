"""Compiled memory of the online train step (frozen encoders inside) against batch size, with and
without encoder micro-batching.

    python benchmarks/online_step_memory.py [--batches 64,256,1024] [--micro 0,32]

Builds a DINOv2-S/14-shaped image encoder (384 wide, 12 layers, 224 px, 257 tokens) and a
MiniLM-L6-shaped BERT (384 wide, 6 layers, 77 tokens) as random Flax checkpoints in a temporary
folder, loads them through align_jax.encoders like any hub checkpoint, and compiles the real
train step (freeze-align token projectors on every token, d = 384, softmax loss) for one CPU
device with ``align_jax.train.aot.compile_train_step``. XLA's memory analysis gives the step's
temporary (activation) memory; nothing runs, so big batches cost only compile time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import transformers  # noqa: E402

from align_jax.train import aot  # noqa: E402
from align_jax.config import schema as config_lib
from align_jax.testing import tiny_checkpoints as tiny  # noqa: E402


def write_encoders(root: str) -> tuple[str, str]:
  image = os.path.join(root, "dinov2_s")
  os.makedirs(image)
  tiny.write_random_weights(image, transformers.Dinov2Config(
      hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
      image_size=224), seed=0)
  transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size=224,
                                 resample=3).save_pretrained(image)
  text = tiny.make_tiny_bert(os.path.join(root, "bert_minilm"), save_format="flax")  # tokenizer
  vocab = len(transformers.AutoTokenizer.from_pretrained(text))
  tiny.write_random_weights(text, transformers.BertConfig(
      vocab_size=vocab, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
      intermediate_size=1536, max_position_embeddings=128), seed=0)
  return image, text


def step_config(image: str, text: str, batch: int, micro: int, heads: str, projector_micro: int):
  config = config_lib.default_config()
  config.batch_size = batch
  config.data.source = "synthetic_shapes"
  m = config.model
  m.image_encoder, m.text_encoder = image, text
  m.max_text_length = 77
  m.embed_dim = 384
  if heads == "tokens":  # freeze-align: token projectors on every token
    m.image_pooling = m.text_pooling = "tokens"
    m.image_projector, m.text_projector = "freeze_align_image", "freeze_align_text"
  else:  # pooled features (CLS / mean) and MLP heads
    m.image_pooling, m.text_pooling = "cls", "mean"
    m.image_projector = m.text_projector = "mlp"
  m.encoder_micro_batch = micro
  m.projector_micro_batch = projector_micro
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="64,256,1024")
  parser.add_argument("--micro", default="0,32")
  parser.add_argument("--projector-micro", default="0",
                      help="model.projector_micro_batch values (rematerialised projector chunks)")
  parser.add_argument("--heads", default="tokens,pooled",
                      help="tokens: freeze-align token projectors; pooled: CLS/mean + MLP")
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(",")]
  micros = [int(m) for m in args.micro.split(",")]
  projector_micros = [int(m) for m in args.projector_micro.split(",")]
  print(f"`python benchmarks/online_step_memory.py --batches {args.batches} --micro {args.micro}"
        f" --projector-micro {args.projector_micro} --heads {args.heads}`"
        f" — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, jax "
        f"{jax.__version__}, 1 CPU device\n")
  print("| heads | batch | encoder micro-batch | projector micro-batch | temp MiB | args MiB | "
        "temp MiB per example | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as root:
    image, text = write_encoders(root)
    for heads in args.heads.split(","):
      for batch in batches:
        for micro in micros:
          for projector_micro in projector_micros:
            config = step_config(image, text, batch, micro, heads, projector_micro)
            report = aot.compile_train_step(config, "cpu:1")
            temp = report.temp_bytes / 2**20
            print(f"| {heads} | {batch:,} | {micro or 'off'} | {projector_micro or 'off'} | "
                  f"{temp:,.0f} | {report.argument_bytes / 2**20:,.0f} | {temp / batch:.2f} | "
                  f"{report.compile_seconds:.1f} |", flush=True)


if __name__ == "__main__":
  main()
