"""DINOv3 ViT-L/16 + Qwen3-Embedding-0.6B: the strongest open image / text pair today, frozen.

    python main.py --config=configs/dinov3_qwen3.py --config.data.urls='/data/cc12m/{00000..01242}.tar' \\
        --workdir=/ckpt/dinov3_qwen3
    python main.py --config=configs/dinov3_qwen3.py:batch=32768 --distributed ...  # TPU pod

Image tower: ``facebook/dinov3-vitl16-pretrain-lvd1689m`` (ViT-L/16, 2-D RoPE, 4 register tokens,
layer scale), at 224 px (14 x 14 patches), pooled as SAIL pools DINOv2: concat(CLS, mean of the
patch tokens; the registers are left out), 2 x 1,024. Text tower: ``Qwen/Qwen3-Embedding-0.6B``
(a Qwen3 decoder, q/k norms, 1,024 wide), pooled as its model card says: the last token
(``text_pooling="last"``, left or right padding alike). Its card puts an instruction before
queries only (``"Instruct: {task}\\nQuery:"``); captions are encoded as documents, so
``model.text_prefix`` is empty (set it to try an instruction). Heads as configs/dinov2_llm.py
(SAIL's): GLU projectors (8x width) on both towers, sigmoid loss (logit scale 20, bias -10), batch
32,768. Both towers together are ~0.9B params, ~1.8 GB in bfloat16: they stay replicated (no FSDP
rules needed on a 16 GB v5e chip).

Compile check for a pod from config files alone (needs libtpu; ``hf download REPO --include
'*.json' 'tokenizer*' --local-dir DIR`` for each tower)::

    python -m align_jax.cli.aot --config=configs/dinov3_qwen3.py:image=/tmp/dinov3-config,text=/tmp/qwen3-config \\
        --topology=v5e-256

and on any machine with tiny config-only folders (tests/test_new_configs.py writes them)::

    python -m align_jax.cli.aot --config=configs/dinov3_qwen3.py:image=/tmp/tiny_dinov3,text=/tmp/tiny_qwen3,size=16,length=12,batch=64,micro=2 \\
        --topology=cpu:8
"""

from align_jax.config import schema as config_lib


def get_config(arg=None):
  variant = config_lib.parse_arg(
      arg, batch=32768, steps=15_500, micro=32, image="facebook/dinov3-vitl16-pretrain-lvd1689m",
      text="Qwen/Qwen3-Embedding-0.6B", pooling="last", length=77, size=224)
  config = config_lib.pod_recipe_config(variant.steps, variant.batch)

  config_lib.use_frozen_encoders(config, variant, image_pooling="cls+mean_patch")
  config_lib.use_sail_heads(config)

  config.evals.coco = config_lib.coco_retrieval_eval()
  return config
