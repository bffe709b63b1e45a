"""Tiny checkpoints and demo helpers for tests, demos and notebooks; the library does not import this."""
