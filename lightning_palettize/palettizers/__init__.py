"""Pure-PyTorch palettizers (no Lightning import): DKM, post-training k-means, SKM."""

from lightning_palettize.palettizers.dkm import DKMPalettizer
from lightning_palettize.palettizers.post_training import PostTrainingPalettizer
from lightning_palettize.palettizers.skm import SKMPalettizer

__all__ = ["DKMPalettizer", "PostTrainingPalettizer", "SKMPalettizer"]
