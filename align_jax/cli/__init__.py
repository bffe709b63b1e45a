"""The command lines, one module per command on absl flags, and the align-jax dispatcher; the library never imports them."""
