"""Training-time augmentation of single mammograms.

Every transform takes and returns one image tensor [1, S, S] (float, values in [0, 1]) of
the same shape, draws its randomness from torch's global generator (so
``torch.manual_seed`` makes it repeatable, and DataLoader workers each get their own
stream), and is picklable. Evaluation uses no transform at all.

`strength` scales every magnitude linearly: 0 is the identity, 1 the default, 2 the most
aggressive setting we consider anatomically plausible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from common.errors import ConfigError

MAX_STRENGTH = 2.0


class RandomGamma(v2.Transform):
    """Raise intensities to a power gamma drawn log-uniformly from [1/max_gamma, max_gamma].

    Changes the mid-tones (how dense tissue renders across scanners and processing) while
    keeping black and white fixed, which brightness or contrast alone cannot do.
    """

    def __init__(self, max_gamma: float) -> None:
        super().__init__()
        if max_gamma < 1.0:
            raise ConfigError(f"RandomGamma max_gamma {max_gamma} is invalid; valid: >= 1")
        self.max_gamma = max_gamma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        log_max = math.log(self.max_gamma)
        return {"gamma": math.exp(torch.empty(1).uniform_(-log_max, log_max).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.adjust_gamma(inpt, params["gamma"])


class RandomZoomCrop(v2.RandomResizedCrop):
    """`RandomResizedCrop` that resizes back to the input's own size, so it fits any image size."""

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float]) -> None:
        # The parent's fixed output `size` is never used: `transform` resizes to the input's size.
        super().__init__(size=1, scale=scale, ratio=ratio, interpolation=InterpolationMode.BILINEAR)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resized_crop(inpt, **params, size=F.get_size(inpt), interpolation=self.interpolation)


class ClampToUnitRange(v2.Transform):
    """Pin values to [0, 1], the range every model input is promised."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return inpt.clamp(0.0, 1.0)


def build_train_transform(strength: float = 1.0, *, enabled: bool = True) -> Callable[[Tensor], Tensor]:
    """The augmentation pipeline for training images; the identity when disabled or at strength 0.

    Geometry first (flips, zoom crop, small affine, rare mild elastic warp), then intensity
    (gamma, brightness/contrast), then acquisition noise.
    """
    if not 0.0 <= strength <= MAX_STRENGTH:
        raise ConfigError(
            f"augmentation.strength {strength} is invalid; valid: 0 <= strength <= {MAX_STRENGTH:g}"
        )
    if not enabled or strength == 0.0:
        return v2.Identity()
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            RandomZoomCrop(scale=(1.0 - 0.25 * strength, 1.0), ratio=(0.9, 1 / 0.9)),
            v2.RandomAffine(
                degrees=10.0 * strength,
                translate=(0.05 * strength, 0.05 * strength),
                scale=(1.0 - 0.05 * strength, 1.0 + 0.05 * strength),
                interpolation=InterpolationMode.BILINEAR,
            ),
            v2.RandomApply([v2.ElasticTransform(alpha=15.0 * strength, sigma=6.0)], p=0.1),
            RandomGamma(max_gamma=math.exp(0.25 * strength)),
            v2.ColorJitter(brightness=0.1 * strength, contrast=0.1 * strength),
            v2.RandomApply([v2.GaussianNoise(sigma=0.02 * strength)], p=0.5),
            ClampToUnitRange(),
        ]
    )
