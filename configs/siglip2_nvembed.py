"""SigLIP 2 So400m/14 (384 px) + NV-Embed-v2, frozen; the 7B text tower FSDP-sharded.

    python main.py --config=configs/siglip2_nvembed.py --config.data.urls='/data/cc12m/{00000..01242}.tar' \\
        --workdir=/ckpt/siglip2_nvembed
    python main.py --config=configs/siglip2_nvembed.py:batch=32768 --distributed ...  # TPU pod

SAIL (CVPR 2025) reaches ImageNet 73.4 zero-shot with NV-Embed-v2 as the text tower (65.4 with
GTE). Image tower: ``google/siglip2-so400m-patch14-384`` (a fixed-resolution SigLIP 2
checkpoint: the SigLIP vision tower, 27 x 27 patches), pooled by its attention-pool head
(``image_pooling="map"``, 1,152 wide). Text tower: ``nvidia/NV-Embed-v2`` (model type
``nvembed``): a Mistral-7B run bidirectionally and NV-Embed's latent-attention pooler
(``text_pooling="latent"``, 4,096 wide, L2-normalised); EOS is appended and the instruction
prefix, if any, is left out of the pooled mean, as NV-Embed's ``encode`` does. Captions are
encoded as passages, which NV-Embed gives no instruction, so ``model.text_prefix`` is empty
(for queries its card uses ``"Instruct: {task}\\nQuery: "``). ``text=Alibaba-NLP/gte-Qwen2-7B-
instruct,pooling=last`` swaps in gte-Qwen2-7B (a Qwen2 decoder, last-token pooling); the
rules below cover it too. Heads, loss and schedule as configs/dinov2_llm.py (SAIL's).

**Sharding.** NV-Embed-v2 is ~7.9B params (the Mistral and a ~0.5B pooler), ~15.7 GB in
bfloat16: ``FROZEN_RULES`` split every text-tower matrix over the ``data`` axis along the model
width (4,096: divisible by up to 4,096 devices). The Mistral's per-layer params are stacked on a
leading layer axis (its scanned blocks, paths ``text/model/layers/...``; gte-Qwen2's are
``text/layers/...``), which stays whole; the pooler's kernels (``text/pooler/...``) are 2-D;
norms stay replicated. SigLIP So400m (0.4B) is replicated. Encoder micro-batches are 4 rows per
chip: with the text tower's width split over the ``data`` axis that also splits the batch, XLA
keeps a layer's activations of every chip's micro-batch on each chip, so the temporaries grow
with 256 x micro rows (benchmarks/README.md, the AOT table's siglip2_nvembed rows: micro 16 needs
40 GB per v5e chip, micro 4 fits with a peak of 11.1 of 16 GiB).

Compile check for a pod from config files alone (needs libtpu)::

    hf download nvidia/NV-Embed-v2 --include '*.json' 'tokenizer*' --local-dir /tmp/nvembed-config
    hf download google/siglip2-so400m-patch14-384 --include '*.json' --local-dir /tmp/siglip2-config
    python -m align_jax.cli.aot --config=configs/siglip2_nvembed.py:image=/tmp/siglip2-config,text=/tmp/nvembed-config \\
        --topology=v5e-256

and on any machine with tiny config-only folders (tests/test_new_configs.py writes them)::

    python -m align_jax.cli.aot --config=configs/siglip2_nvembed.py:image=/tmp/tiny_siglip,text=/tmp/tiny_nvembed,size=16,length=12,batch=64,micro=2 \\
        --topology=cpu:8
"""

from align_jax.config import schema as config_lib

_WIDE_IN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)"  # kernels [D, out]
_WIDE_OUT = r"(o_proj|down_proj)"  # kernels [in, D]
# First match wins; paths are "text/<Flax param path>" (NV-Embed: text/model/..., text/pooler/...;
# gte-Qwen2 and other decoders: text/layers/...).
FROZEN_RULES = (
    (rf"^text/(model/)?layers/{_WIDE_IN}/kernel$", (None, "data", None)),
    (rf"^text/(model/)?layers/{_WIDE_OUT}/kernel$", (None, None, "data")),
    (r"^text/(model/)?embed_tokens/embedding$", (None, "data")),
    (r"^text/pooler/(to_q|to_k|to_v|ff_value|ff_gate)/kernel$", ("data", None)),
    (r"^text/pooler/(to_out|ff_out)/kernel$", (None, "data")),
    (r"^text/pooler/latents$", (None, "data")),
)


def get_config(arg=None):
  variant = config_lib.parse_arg(
      arg, batch=32768, steps=15_500, micro=4, image="google/siglip2-so400m-patch14-384",
      text="nvidia/NV-Embed-v2", pooling="latent", length=77, size=384, fsdp=True)
  config = config_lib.pod_recipe_config(variant.steps, variant.batch)

  config_lib.use_frozen_encoders(config, variant, image_pooling="map")
  config_lib.use_sail_heads(config)

  if variant.fsdp:
    config.mesh.frozen_param_rules = FROZEN_RULES
    config.mesh.param_rules = config_lib.SAIL_GLU_PARAM_RULES

  config.evals.coco = config_lib.coco_retrieval_eval()
  return config
