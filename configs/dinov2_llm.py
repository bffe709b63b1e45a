"""DINOv2-L + a 7B decoder-LLM text encoder (E5-Mistral-7B-instruct), frozen and FSDP-sharded.

    # 1. SAIL's two stages: store the frozen features once (both encoders sharded as below) ...
    python main.py --config=configs/dinov2_llm.py --mode=extract_features \\
        --config.data.urls='/data/cc12m/{00000..01242}.tar' --workdir=/features/cc12m
    # ... 2. then train the heads on them (no encoder in the step)
    python main.py --config=configs/dinov2_llm.py --config.data.source=features \\
        --config.data.path=/features/cc12m --config.model.image_encoder=features \\
        --config.model.text_encoder=features --workdir=/ckpt/llm
    # or online, both encoders inside every step (as configs/dinov2_roberta.py)
    python main.py --config=configs/dinov2_llm.py --config.data.urls=... --workdir=/ckpt/llm_online

SAIL (Zhang et al., CVPR 2025) reaches ImageNet 73.4 with DINOv2-L and NV-Embed-v2, a
Mistral-7B-based embedder (bidirectional attention and a latent-attention pooler). align_jax runs it
too: configs/siglip2_nvembed.py, whose sharding rules cover its param paths (``text/model/...``,
``text/pooler/...``; ``LLM_FROZEN_RULES`` below do not). The text tower here is a plain Mistral
embedder, ``intfloat/e5-mistral-7b-instruct``, pooled as its model card says: the last token (the
EOS its tokenizer appends), ``text_pooling="last"``. Its card puts an instruction before queries
only (``"Instruct: {task}\\nQuery: "``) and none before documents; captions are encoded as documents
here, so ``model.text_prefix`` is empty; set it for an instruction, e.g.
``--config.model.text_prefix=$'Instruct: Retrieve images that match the caption\\nQuery: '``. Any
Llama (Llama-3 included) / Mistral / Qwen2 / Qwen3 / Gemma checkpoint (``variant text=...``) and T5
/ mT5 encoders (GTR, sentence-T5; ``pooling=mean``) work with the same rules. SAIL's heads: image
feature concat(CLS, mean patch) of DINOv2 (2 x 1024), GLU projectors (8x width) on both towers,
sigmoid loss with logit scale 20 and bias -10, batch 32,768. The optimiser is align_jax's AdamW with
the freeze-align schedule (SAIL used Lion, lr 1e-5, which align_jax does not implement).

**Sharding.** 7B params are ~14.5 GB in bfloat16: with activations they do not fit replicated on
a 16 GB v5e chip. ``LLM_FROZEN_RULES`` splits every text-tower matrix and the embedding table over
the ``data`` axis along the model width (4,096 for Mistral-7B: divisible by up to 4,096 devices),
so each device holds 1/N of the text weights (~220 MB on a v5e-64); norms stay replicated. The
decoder's params are loaded into host memory (memory-mapped safetensors) and placed shard by
shard, never whole on one chip. DINOv2-L (0.6 GB) stays replicated. Encoder micro-batches are 4
rows per chip: with the width split over the same ``data`` axis that splits the batch, XLA keeps
a layer's activations of every chip's micro-batch on each chip rather than gathering the layer's
weights, so the temporaries grow with 256 x micro rows (benchmarks/README.md, the AOT table's
dinov2_llm rows: micro 32 needs 34.4 GB per v5e chip, micro 4 fits with a peak of 5.0 of 16 GiB).

**Checking the 7B step before a pod** (compile only, no weights: needs libtpu, ``pip install
'jax[tpu]==0.10.2'``, and config-only encoder folders, i.e. ``config.json`` plus the tokenizer and
processor files, read by align_jax.train.aot's abstract loading)::

    hf download intfloat/e5-mistral-7b-instruct --include '*.json' 'tokenizer*' \\
        --local-dir /tmp/e5-mistral-config
    hf download facebook/dinov2-large --include '*.json' --local-dir /tmp/dinov2-config
    python -m align_jax.cli.aot --config=configs/dinov2_llm.py:image=/tmp/dinov2-config,text=/tmp/e5-mistral-config \\
        --topology=v5e-64

It prints per-device memory (arguments include 1/64 of the text tower) and FLOPs. On any machine,
the same config compiles on ``--topology=cpu:8`` with tiny random checkpoints (written by
``align_jax.testing.tiny_checkpoints.make_tiny_dinov2(dir, image_size=16)`` /
``make_tiny_llama(dir)``; tests/test_llm_config.py)::

    python -m align_jax.cli.aot --config=configs/dinov2_llm.py:image=/tmp/tiny_dinov2,text=/tmp/tiny_llama,size=16,length=12,batch=64,micro=2 \\
        --topology=cpu:8
"""

from align_jax.config import schema as config_lib

# Frozen text-tower params split over the data axis along the model width D (first match wins;
# paths are "text/<Flax param path>"). Llama / Mistral / Gemma: q, k, v, gate and up kernels are
# [D, out], o and down kernels [in, D], the embedding [vocab, D]. T5 / mT5: q, k, v, wi kernels
# [D, out], o and wo [in, D], the shared embedding [vocab, D].
LLM_FROZEN_RULES = (
    # Per-layer params are stacked on a leading layer axis (the scanned blocks): never split it.
    (r"^text/layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", (None, "data", None)),
    (r"^text/layers/(o_proj|down_proj)/kernel$", (None, None, "data")),
    (r"^text/embed_tokens/embedding$", (None, "data")),
    (r"^text/layers/(q|k|v|wi|wi_0|wi_1)/kernel$", (None, "data", None)),
    (r"^text/layers/(o|wo)/kernel$", (None, None, "data")),
)


def get_config(arg=None):
  variant = config_lib.parse_arg(
      arg, batch=32768, steps=15_500, micro=4, image="facebook/dinov2-large",
      text="intfloat/e5-mistral-7b-instruct", pooling="last", length=77, size=224, fsdp=True)
  config = config_lib.pod_recipe_config(variant.steps, variant.batch)

  config_lib.use_frozen_encoders(config, variant, image_pooling="cls+mean_patch")
  config_lib.use_sail_heads(config)

  if variant.fsdp:
    config.mesh.frozen_param_rules = LLM_FROZEN_RULES
    config.mesh.param_rules = config_lib.SAIL_GLU_PARAM_RULES

  config.evals.coco = config_lib.coco_retrieval_eval()
  return config
