"""Pure-PyTorch palettizers (no Lightning import): DKM, post-training k-means, SKM."""

from lightning_palettize.palettizers.post_training import PostTrainingPalettizer

__all__ = ["PostTrainingPalettizer"]
