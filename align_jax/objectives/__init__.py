"""The contrastive objectives: the losses, the loss kinds, the loss variants, the objective.

Imports go one way: contrastive <- kinds <- multi_positive, cwcl, structure <- objective.
"""
