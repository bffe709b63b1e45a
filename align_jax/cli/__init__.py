"""The command lines: the align-jax dispatcher, the training command and the shared absl runner."""
