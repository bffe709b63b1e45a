"""The contrastive objectives: the losses, the loss kinds and their variants."""
