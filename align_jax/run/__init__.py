"""The run directory: storage (local or gs://), checkpoints, checksums, metrics, read-back."""
