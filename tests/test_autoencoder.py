"""Autoencoder pretraining: it learns, it is repeatable, and its encoder moves into a classifier."""

import pytest
import torch
from torch.utils.data import TensorDataset

from common.errors import ConfigError, DataError
from common.models.autoencoder import ConvAutoencoder, reconstruction_error, save_encoder
from common.models.classifier import build_classifier
from common.models.encoders import build_encoder
from common.models.transfer import load_pretrained_encoder
from common.pretraining import PretrainResult, pretrain_autoencoder

SIZE = 32  # small enough for CPU test runs; smallcnn (stride 16) still sees a 2x2 map


def blob_images(count, seed=0):
    """Smooth bright blobs on a dark background: a crude stand-in for tissue on film."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, SIZE)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    centres = torch.rand(count, 2, 1, 1, generator=generator) - 0.5
    widths = 0.25 + 0.25 * torch.rand(count, 1, 1, generator=generator)
    squared_distance = (rows - centres[:, 0]) ** 2 + (cols - centres[:, 1]) ** 2
    return torch.exp(-squared_distance / (2 * widths**2)).unsqueeze(1)


def unlabeled_pool(count=16):
    return TensorDataset(blob_images(count), torch.zeros(count, dtype=torch.long))


@pytest.fixture(scope="module")
def two_pretraining_runs(tmp_path_factory):
    """The same seeded pretraining, run twice."""
    folder = tmp_path_factory.mktemp("pretraining")
    return [
        pretrain_autoencoder(
            unlabeled_pool(),
            encoder_name="smallcnn",
            norm="group",
            epochs=2,
            batch_size=8,
            learning_rate=3e-3,
            seed=7,
            out_path=folder / f"run{run}" / "encoder.pt",
        )
        for run in (1, 2)
    ]


@pytest.mark.parametrize("size", [SIZE, 40])
def test_reconstruction_has_the_input_shape_and_range(size):
    model = ConvAutoencoder(build_encoder("smallcnn"))
    images = torch.rand(2, 1, size, size)

    reconstruction = model(images)

    assert reconstruction.shape == images.shape
    assert 0.0 <= reconstruction.min() and reconstruction.max() <= 1.0


def test_pretraining_reduces_the_loss_and_writes_an_encoder_a_classifier_can_load(two_pretraining_runs):
    result = two_pretraining_runs[0]
    classifier = build_classifier("smallcnn", norm="group")

    load_pretrained_encoder(classifier.encoder, result.out_path)

    assert isinstance(result, PretrainResult) and result.epochs == 2 and len(result.losses) == 2
    assert result.losses[1] < result.losses[0] and result.final_loss == result.losses[-1]
    saved = torch.load(result.out_path, weights_only=True)
    assert saved["format"] == "mammofl-encoder" and saved["encoder"] == "smallcnn"
    for key, tensor in saved["state_dict"].items():
        assert torch.equal(classifier.encoder.state_dict()[key], tensor), key


def test_pretraining_is_repeatable_under_a_seed(two_pretraining_runs):
    first, second = two_pretraining_runs

    assert first.losses == second.losses
    first_weights = torch.load(first.out_path, weights_only=True)["state_dict"]
    second_weights = torch.load(second.out_path, weights_only=True)["state_dict"]
    assert all(torch.equal(first_weights[key], second_weights[key]) for key in first_weights)


def test_pretraining_refuses_an_empty_pool_or_no_epochs(tmp_path):
    empty = TensorDataset(torch.zeros(0, 1, SIZE, SIZE), torch.zeros(0))
    arguments = dict(encoder_name="smallcnn", norm="batch", batch_size=4, learning_rate=1e-3, seed=0)

    with pytest.raises(DataError, match="empty"):
        pretrain_autoencoder(empty, epochs=1, out_path=tmp_path / "e.pt", **arguments)
    with pytest.raises(ConfigError, match="epochs"):
        pretrain_autoencoder(unlabeled_pool(), epochs=0, out_path=tmp_path / "e.pt", **arguments)


def test_reconstruction_error_flags_images_unlike_the_training_pool(tmp_path):
    torch.manual_seed(0)
    model = ConvAutoencoder(build_encoder("smallcnn", norm="group"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    pool = blob_images(8)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(pool), pool).backward()
        optimizer.step()
    model.train()

    familiar = reconstruction_error(model, blob_images(8, seed=1))
    noise = reconstruction_error(model, torch.rand(8, 1, SIZE, SIZE))

    assert familiar.shape == (8,)
    assert familiar.max() < noise.min()
    assert model.training
    save_encoder(model, tmp_path / "encoder.pt")
    assert (tmp_path / "encoder.pt").is_file()
