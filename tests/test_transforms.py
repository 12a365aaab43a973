"""Training augmentation keeps the image contract: same shape, values in [0, 1], repeatable."""

import pickle

import pytest
import torch

from common.data.transforms import RandomGamma, RandomZoomCrop, build_train_transform
from common.errors import ConfigError


def mammogram_like(size=64):
    """A bright half-disc on black: background, tissue edge and saturated pixels in one image."""
    axis = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return ((rows**2 + (cols + 1) ** 2) < 1.2).float().mul(0.8).add(0.2 * torch.rand(size, size)).unsqueeze(0)


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("size", [64, 96])
def test_augmented_images_keep_shape_dtype_and_range(strength, size):
    transform = build_train_transform(strength)
    image = mammogram_like(size)

    for seed in range(10):
        torch.manual_seed(seed)
        augmented = transform(image)
        assert augmented.shape == image.shape and augmented.dtype == torch.float32
        assert 0.0 <= augmented.min() and augmented.max() <= 1.0


def test_augmentation_changes_the_image():
    torch.manual_seed(0)
    image = mammogram_like()

    assert not torch.equal(build_train_transform(1.0)(image), image)


@pytest.mark.parametrize("transform", [build_train_transform(0.0), build_train_transform(1.0, enabled=False)])
def test_strength_zero_or_disabled_is_the_identity(transform):
    image = mammogram_like()

    assert torch.equal(transform(image), image)


def test_same_seed_gives_the_same_augmentation_even_after_pickling():
    transform = build_train_transform(1.0)
    copy = pickle.loads(pickle.dumps(transform))  # as DataLoader workers receive it
    image = mammogram_like()

    torch.manual_seed(3)
    first = transform(image)
    torch.manual_seed(3)
    second = copy(image)
    third = transform(image)

    assert torch.equal(first, second)
    assert not torch.equal(second, third)


def test_strength_outside_the_valid_range_is_refused():
    with pytest.raises(ConfigError, match=r"0 <= strength <= 2"):
        build_train_transform(2.5)
    with pytest.raises(ConfigError, match="strength"):
        build_train_transform(-0.1)


def test_gamma_bends_mid_tones_but_keeps_black_and_white():
    torch.manual_seed(0)
    image = torch.tensor([[[0.0, 0.5, 1.0]]])

    changed = [RandomGamma(max_gamma=2.0)(image) for _ in range(5)]

    assert all(out[0, 0, 0] == 0.0 and out[0, 0, 2] == 1.0 for out in changed)
    assert any(abs(out[0, 0, 1] - 0.5) > 0.01 for out in changed)


def test_zoom_crop_returns_the_input_size_whatever_it_is():
    crop = RandomZoomCrop(scale=(0.5, 1.0), ratio=(0.9, 1.1))

    assert crop(torch.rand(1, 80, 80)).shape == (1, 80, 80)
    assert crop(torch.rand(1, 48, 64)).shape == (1, 48, 64)
