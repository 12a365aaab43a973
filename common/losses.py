"""Loss functions selectable by the config's ``loss`` key."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from common.errors import ConfigError

LOSS_NAMES = ("cross_entropy", "weighted_cross_entropy", "focal")


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): down-weights easy examples by (1 - p_t) ** gamma.

    Useful when normals dominate and the few malignant images are the hard ones.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=1)
        log_p_true = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
        focal = (1.0 - log_p_true.exp()).pow(self.gamma) * -log_p_true
        if self.weight is not None:
            focal = focal * self.weight[target]
        return focal.mean() if focal.numel() else logits.sum() * 0.0


def inverse_frequency_weights(class_counts: list[int]) -> torch.Tensor:
    """Weights proportional to 1 / count, scaled so that a balanced set gets all ones.

    A class absent from the training set gets weight 0 (it contributes no loss anyway).
    """
    counts = torch.tensor(class_counts, dtype=torch.float32)
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights


def build_loss(name: str, class_counts: list[int]) -> nn.Module:
    """The loss named in the config; `class_counts` feed the weighted variant."""
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()
    if name == "weighted_cross_entropy":
        return nn.CrossEntropyLoss(weight=inverse_frequency_weights(class_counts))
    if name == "focal":
        return FocalLoss()
    raise ConfigError(f"unknown loss {name!r}; allowed: {', '.join(LOSS_NAMES)}")
