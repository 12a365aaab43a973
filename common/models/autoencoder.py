"""A convolutional autoencoder on any registry encoder, for self-supervised pretraining.

Unlabeled mammograms are plentiful where labels are not: reconstructing them teaches the
encoder the look of breast tissue, and `save_encoder` hands that encoder to the
classifier (`common.models.transfer`). The per-image reconstruction error doubles as an
anomaly score: images unlike the training pool reconstruct badly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.models.encoders import Encoder
from common.models.transfer import save_encoder_checkpoint

# The decoder is deliberately small: the encoder should carry the representation.
DECODER_WIDTH = 64
_MIN_DECODER_CHANNELS = 8


def _decoder(in_channels: int, reduction: int) -> nn.Sequential:
    """Feature map [N, C, S/r, S/r] -> image [N, 1, S, S] in [0, 1]: a 1x1 squeeze, then
    log2(r) steps of x2 nearest upsampling + 3x3 conv halving the channels, then sigmoid."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, DECODER_WIDTH, 1), nn.ReLU()]
    channels = DECODER_WIDTH
    for _ in range(int(math.log2(reduction))):
        narrower = max(channels // 2, _MIN_DECODER_CHANNELS)
        layers += [nn.Upsample(scale_factor=2), nn.Conv2d(channels, narrower, 3, padding=1), nn.ReLU()]
        channels = narrower
    layers += [nn.Conv2d(channels, 1, 3, padding=1), nn.Sigmoid()]
    return nn.Sequential(*layers)


class ConvAutoencoder(nn.Module):
    """Images [N, 1, S, S] in [0, 1] -> reconstructions of the same shape, in [0, 1]."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = _decoder(encoder.out_features, encoder.reduction)

    def forward(self, images: Tensor) -> Tensor:
        reconstruction = self.decoder(self.encoder.forward_features(images))
        if reconstruction.shape[-2:] != images.shape[-2:]:
            # Sizes that are not a multiple of the encoder's stride come back slightly larger.
            reconstruction = F.interpolate(reconstruction, size=images.shape[-2:], mode="bilinear")
        return reconstruction


def reconstruction_error(model: ConvAutoencoder, images: Tensor) -> Tensor:
    """Per-image mean squared reconstruction error [N], computed in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        error = (model(images) - images).pow(2).mean(dim=(1, 2, 3))
    model.train(was_training)
    return error


def save_encoder(autoencoder: ConvAutoencoder, path: Path, *, source: str = "training-data", detail: str = "") -> None:
    """Write the pretrained encoder (the decoder is discarded) as a mammofl-encoder file."""
    save_encoder_checkpoint(autoencoder.encoder, path, source=source, detail=detail)
