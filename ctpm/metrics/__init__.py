"""torchmetrics metrics of the project: voxel-wise Spearman R and functional-volume Dice.

Each has a :class:`torchmetrics.Metric` for training/validation (DDP-safe, constant memory) and a
functional form for the evaluation code, which also takes single numpy volumes.
"""

from ctpm.metrics.dice import FunctionalDice, functional_dice
from ctpm.metrics.spearman import SpearmanR, spearman_r

__all__ = ["FunctionalDice", "SpearmanR", "functional_dice", "spearman_r"]
