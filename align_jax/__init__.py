"""align_jax: align two frozen pretrained encoders into a CLIP-like model by training small projectors.

Submodules are imported on use (``from align_jax.objectives import contrastive``) so that importing
the package does not pull in every dependency.
"""

from align_jax.version import __version__  # noqa: F401  (re-exported)


def __getattr__(name):  # AlignedModel on first use, so `import align_jax` stays cheap
  if name == "AlignedModel":
    from align_jax.serving.inference import AlignedModel
    return AlignedModel
  raise AttributeError(f"module 'align_jax' has no attribute {name!r}")
