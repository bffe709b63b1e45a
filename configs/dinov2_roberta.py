"""freeze-align (Maniparambil et al., CVPR 2025): frozen DINOv2-L + all-roberta-large-v1, token projectors.

    python main.py --config=configs/dinov2_roberta.py --config.data.urls='/data/cc12m/{00000..01242}.tar' --workdir=/ckpt/fa
    python main.py --config=configs/dinov2_roberta.py:batch=32768,fsdp=True --distributed ...  # TPU pod

Online mode: both encoders run inside the train step every step (as in the paper: no feature
cache), under stop_gradient, in bfloat16 and in micro-batches of ``micro`` rows per device, and
the token projectors run in rematerialised micro-batches too, so activation memory does not grow
with the global batch (only the frozen token features do; benchmarks/README.md). DINOv2 runs at 256 px (18x18 patches +
CLS, position embeddings resampled as PyTorch does); text is cut at 77 tokens. Only the token
projectors (CLS + mean-patch fusion for images, masked mean + global head for text; d = 1024,
~11.5M params) and the temperature (0.07, learnable, clamped to [0.001, 0.5]) train, with AdamW
1e-3, weight decay 0.02, 1,000 warm-up steps and cosine decay to 1e-5.

The paper trains ~255M samples seen (15 epochs of its 17M pairs at batch 14,400); ``steps``
defaults to that at batch 16,384. Data: WebDataset shards as img2dataset writes them
(``data.urls``), or ``--config.data.source=tfds --config.data.name=coco_captions``. Encoders come
from the Hugging Face hub or local folders (``--config.model.image_encoder=/path/to/dinov2-large``);
without network or a local copy the run stops at once naming the missing model.
"""

from align_jax.config import schema as config_lib


def get_config(arg=None):
  variant = config_lib.parse_arg(arg, batch=16384, steps=15_500, micro=64, fsdp=False,
                                 loss="softmax")
  config = config_lib.pod_recipe_config(variant.steps, variant.batch)

  m = config.model
  m.image_encoder = "facebook/dinov2-large"
  m.image_size = 256
  m.image_pooling = "tokens"
  m.text_encoder = "sentence-transformers/all-roberta-large-v1"
  m.text_pooling = "tokens"
  m.max_text_length = 77
  m.encoder_dtype = "bfloat16"
  m.encoder_micro_batch = variant.micro
  m.projector_micro_batch = variant.micro  # token projectors rematerialised chunk by chunk
  m.image_projector = "freeze_align_image"
  m.text_projector = "freeze_align_text"
  m.embed_dim = 1024
  m.dropout = 0.1

  config.loss.name = variant.loss
  config.loss.temperature_init = 0.07
  config.loss.temperature_min = 0.001
  config.loss.temperature_max = 0.5

  config.optim.learning_rate = 1e-3
  config.optim.end_learning_rate = 1e-5
  config.optim.warmup_steps = 1000
  config.optim.weight_decay = 0.02

  if variant.fsdp:
    # Frozen encoder matrices split over the data axis along their input dimension (FSDP-style):
    # for encoders too large to replicate. Every such dimension of DINOv2-L / RoBERTa-L (1024,
    # 4096) divides by up to 1,024 devices. Per-layer params are stacked (scanned blocks) on a
    # leading layer axis, which stays whole.
    config.mesh.frozen_param_rules = (
        (r"layers/(attn/|mlp/)?(q|k|v|o|fc1|fc2|query|key|value|attention_out|intermediate|"
         r"output)/kernel$", (None, "data", None)),)

  config.evals.coco = config_lib.coco_retrieval_eval()
  return config
