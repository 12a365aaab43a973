"""The classifier a configuration asks for, with its transferred weights."""

from __future__ import annotations

from common.config import ExperimentConfig
from common.errors import ConfigError
from common.models.classifier import MammoClassifier, build_classifier
from common.models.transfer import FreezeSchedule, load_pretrained_encoder


def classifier_from_config(config: ExperimentConfig) -> MammoClassifier:
    """Build the configured encoder + head; load ``model.pretrained`` into the encoder if set."""
    model = build_classifier(config.encoder, norm=config.norm, dropout=config.model.dropout)
    pretrained = config.model.pretrained
    if pretrained is not None:
        if not pretrained.is_file():
            raise ConfigError(
                f"model.pretrained: weights file {pretrained} not found; create it with "
                "`mammofl pretrain CONFIG`, point it at a local torchvision or mammofl checkpoint, or set it to null"
            )
        load_pretrained_encoder(model.encoder, pretrained)
    return model


def freeze_schedule_from_config(config: ExperimentConfig) -> FreezeSchedule:
    freeze = config.model.freeze
    return FreezeSchedule(
        head_only_epochs=freeze.head_only_epochs, unfreeze_last_blocks=freeze.unfreeze_last_blocks
    )
