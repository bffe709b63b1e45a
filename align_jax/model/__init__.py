"""The two-tower model: frozen encoders + trainable projectors, and the encoder protocols."""
