"""Loss functions selectable by the config's ``loss`` key.

Under DP every loss is a mean of per-example terms, each depending on its own example only,
and honours ``reduction`` ("mean", "sum", "none"). DP-SGD needs both: Opacus' ghost clipping
sets ``criterion.reduction = "none"`` to get one loss per example, and per-example clipping
bounds one example's influence only when no example's loss depends on another. Torch's
weighted cross-entropy divides by the batch's summed weights, so one added example rescales
every other one: it serves non-private training only, where it is the usual definition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from common.errors import ConfigError

LOSS_NAMES = ("cross_entropy", "weighted_cross_entropy", "focal")
Reduction = str  # "mean" | "sum" | "none"


class PerExampleLoss(nn.Module):
    """A loss that is the `reduction` of per-example terms ``per_example(logits, target)``."""

    def __init__(self, weight: torch.Tensor | None = None, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction

    def per_example(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = self.per_example(logits, target)
        if self.weight is not None:
            terms = terms * self.weight[target]
        if self.reduction == "none":
            return terms
        if self.reduction == "sum":
            return terms.sum()
        if self.reduction != "mean":
            raise ValueError(f"reduction {self.reduction!r}; valid: mean, sum, none")
        # An empty Poisson batch still takes its (noise-only) step: a zero loss on the graph.
        return terms.mean() if terms.numel() else logits.sum() * 0.0


class WeightedCrossEntropy(PerExampleLoss):
    """Cross-entropy times a per-class weight, averaged over examples (not over weights)."""

    def per_example(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction="none")


class FocalLoss(PerExampleLoss):
    """Focal loss (Lin et al. 2017): down-weights easy examples by (1 - p_t) ** gamma.

    Useful when normals dominate and the few malignant images are the hard ones.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, reduction: Reduction = "mean") -> None:
        super().__init__(weight, reduction)
        self.gamma = gamma

    def per_example(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p_true = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        return (1.0 - log_p_true.exp()).pow(self.gamma) * -log_p_true


def inverse_frequency_weights(class_counts: list[int]) -> torch.Tensor:
    """Weights proportional to 1 / count, scaled so that a balanced set gets all ones.

    A class absent from the training set gets weight 0 (it contributes no loss anyway).
    """
    counts = torch.tensor(class_counts, dtype=torch.float32)
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights


def build_loss(name: str, class_counts: list[int], *, class_weights: Sequence[float] | None = None,
               private: bool = False) -> nn.Module:
    """The loss named in the config; `private` for DP-SGD (per-example terms only).

    `class_weights` (the config's, public) weight the weighted variant; without them the
    weights come from `class_counts`, the labels of the data trained on, which a private
    site may not use (the config refuses that combination under DP).
    """
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()
    if name == "weighted_cross_entropy":
        weights = (torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None
                   else inverse_frequency_weights(class_counts))
        return WeightedCrossEntropy(weights) if private else nn.CrossEntropyLoss(weight=weights)
    if name == "focal":
        return FocalLoss(weight=torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None)
    raise ConfigError(f"unknown loss {name!r}; allowed: {', '.join(LOSS_NAMES)}")
