"""CPU demo: align two fixed random nonlinear "encoders" of a shared latent, in a couple of minutes.

    python main.py --config=configs/demo.py --workdir=/tmp/align_demo

Each pair is one latent vector seen through two different noisy views; each view goes through its
own frozen random network (tanh for "images", sin for "texts"), so the two feature spaces differ
nonlinearly. Only the MLP projectors and the temperature train. Held-out pairs (never trained on)
are scored by image->text and text->image recall@K among 1,000 candidates (chance R@1 = 0.001);
expect R@1 well above 0.5 at the end. Variants: ``configs/demo.py:steps=50`` (shorter),
``:loss=sigmoid`` (SigLIP loss).
"""

from align_jax.config import schema as config_lib


def get_config(arg=None):
  variant = config_lib.parse_arg(arg, steps=600, loss="softmax")
  config = config_lib.default_config()
  config.total_steps = variant.steps
  config.batch_size = 512
  config.log_every = 50
  config.eval_every = 200
  config.checkpoint_every = 200
  config.eval_at_start = True  # the untrained baseline, for comparison

  config.data.source = "synthetic"
  config.data.num_pairs = 20000
  config.data.num_heldout = 1000
  config.data.latent_dim = 32
  config.data.noise = 0.5

  config.model.image_encoder = "random_mlp"
  config.model.text_encoder = "random_mlp"
  config.model.encoder_width = 256
  config.model.encoder_output_dim = 128
  config.model.image_projector = "mlp"
  config.model.text_projector = "mlp"
  config.model.embed_dim = 64
  config.model.hidden_dim = 256
  config.model.dropout = 0.0

  config.loss.name = variant.loss
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 0.02

  config.evals.heldout = dict(type="retrieval", data=dict(split="heldout"), batch_size=1000,
                              ks=(1, 5, 10))
  return config
