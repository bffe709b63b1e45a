"""A trained model for users: AlignedModel and the shareable export."""
