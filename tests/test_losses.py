"""Loss selection: weights follow class frequencies; focal loss reduces to CE at gamma 0."""

import pytest
import torch
from torch import nn

from common.errors import ConfigError
from common.losses import FocalLoss, build_loss, inverse_frequency_weights


def test_inverse_frequency_weights_balance_the_classes():
    weights = inverse_frequency_weights([60, 30, 10])
    assert torch.allclose(weights * torch.tensor([60.0, 30.0, 10.0]), torch.full((3,), 100 / 3))
    assert inverse_frequency_weights([10, 0, 10]).tolist() == [1.0, 0.0, 1.0]


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_smaller_otherwise():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 3), torch.randint(0, 3, (16,))
    cross_entropy = nn.functional.cross_entropy(logits, target)
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, target), cross_entropy)
    assert FocalLoss(gamma=2.0)(logits, target) < cross_entropy


def test_build_loss_by_name():
    assert isinstance(build_loss("cross_entropy", [1, 1, 1]), nn.CrossEntropyLoss)
    weighted = build_loss("weighted_cross_entropy", [8, 4, 4])
    assert weighted.weight.tolist() == pytest.approx([2 / 3, 4 / 3, 4 / 3])
    with pytest.raises(ConfigError, match="allowed: cross_entropy"):
        build_loss("hinge", [1, 1, 1])
