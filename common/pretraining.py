"""Self-supervised pretraining: an autoencoder learns to redraw the unlabeled pool.

Only its encoder is kept (mammofl-encoder file), for a classifier to start from via
``model.pretrained``. Labels in the dataset are ignored, so any image pool will do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from common.errors import ConfigError, DataError
from common.models.autoencoder import ConvAutoencoder, save_encoder
from common.models.encoders import Norm, build_encoder
from common.models.transfer import save_encoder_checkpoint
from common.training import seed_everything, train_one_epoch


@dataclass(frozen=True)
class PretrainResult:
    out_path: Path
    epochs: int
    final_loss: float
    losses: tuple[float, ...]  # mean reconstruction MSE per image, one per epoch


class _SelfTargets(Dataset):
    """`dataset` with each image as its own target, so the ordinary training loop applies."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.dataset[index][0]
        return image, image


def pretrain_autoencoder(
    dataset: Dataset,
    *,
    encoder_name: str,
    norm: Norm,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    out_path: Path,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
    source: str = "training-data",
    source_detail: str = "",
) -> PretrainResult:
    """Train a `ConvAutoencoder` on `dataset` ((image [1, S, S] in [0, 1], label) items) with
    Adam and pixel MSE, then write its encoder to `out_path`.

    Seeds every generator from `seed`: on the CPU two runs give identical losses and weights.
    `source` is what `dataset` is ("public" or "training-data"), recorded in the file.
    """
    if epochs < 1:
        raise ConfigError(f"pretraining.epochs {epochs} is invalid; valid: an integer >= 1")
    if len(dataset) == 0:
        raise DataError("pretraining needs images, but the unlabeled pool is empty")
    generator = seed_everything(seed)
    device = torch.device(device)
    model = ConvAutoencoder(build_encoder(encoder_name, norm=norm)).to(device)
    loader = DataLoader(
        _SelfTargets(dataset),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.MSELoss()
    losses: list[float] = []
    for epoch in range(1, epochs + 1):
        loss = train_one_epoch(
            model, loader, optimizer, loss_fn,
            device=device, progress=progress, description=f"pretrain {epoch}/{epochs}",
        )
        losses.append(loss)
    save_encoder(model, out_path, source=source, detail=source_detail)
    return PretrainResult(out_path=Path(out_path), epochs=epochs, final_loss=losses[-1], losses=tuple(losses))



@dataclass(frozen=True)
class FeatureStatistics:
    out_path: Path
    images: int  # how many images the statistics were measured on


@torch.no_grad()
def measure_feature_statistics(
    dataset: Dataset,
    *,
    encoder_name: str,
    norm: Norm,
    batch_size: int,
    out_path: Path,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    source: str = "training-data",
    source_detail: str = "",
) -> FeatureStatistics:
    """For an encoder without parameters (wavelet scattering): measure the per-feature mean
    and standard deviation of its output on `dataset` and write them into the encoder file.

    That is all such an encoder ever learns from images, so the pool must be public for a
    federated run (the file records `source`, and a federated run refuses anything else).
    """
    if len(dataset) < 2:
        raise DataError(f"measuring feature statistics needs at least 2 images, but the pool holds {len(dataset)}")
    encoder = build_encoder(encoder_name, norm=norm).to(device).eval()
    standardiser = getattr(encoder.trunk, "standardise", None)
    if standardiser is None:
        raise ConfigError(f"encoder {encoder_name!r} learns its weights: pretrain it as an autoencoder")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    raw = torch.cat([encoder.trunk.raw(((images.to(device) - encoder.input_mean) / encoder.input_std)).cpu()
                     for images, _ in loader])
    standardiser.set_statistics(raw.mean(dim=0).to(device), raw.std(dim=0).to(device))
    save_encoder_checkpoint(encoder, out_path, source=source, detail=source_detail)
    return FeatureStatistics(out_path=Path(out_path), images=len(raw))
