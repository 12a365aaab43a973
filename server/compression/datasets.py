"""The images compression works on, as arrays: server-held calibration images and the
run's held-out test split.

Calibration images steer int8 ranges and the repair fine-tunes, so they must never be
site data (the server is not allowed to hold any): either synthetic mammograms rendered
with a seed of their own, or a public CBIS-DDSM tree outside the run's data root.
`check_calibration_source` refuses anything else before work starts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from common.config import CalibrationConfig, ExperimentConfig, SyntheticDataConfig
from common.data.cbis import load_cbis_ddsm, load_site_folders
from common.data.dataset import MammogramDataset
from common.data.pipeline import (
    centralised_splits,
    ensure_synthetic,
    load_records,
    make_loader,
)
from common.data.records import ImageRecord
from common.errors import ConfigError, DataError

# Rows of synthetic calibration mammograms when the run's own data is not synthetic.
DEFAULT_SYNTHETIC_ROWS = 512


def check_calibration_source(config: ExperimentConfig, calibration: CalibrationConfig) -> None:
    """Raise ConfigError if `calibration` could yield no images or could yield site data."""
    if calibration.source == "synthetic":
        if config.data.source == "synthetic" and calibration.seed == config.data.synthetic.seed:
            raise ConfigError(
                f"compression.calibration.seed {calibration.seed} equals data.synthetic.seed: the calibration "
                "images would be the sites' own images; choose another seed"
            )
        return
    folder = Path(calibration.folder).resolve()
    site_root = Path(config.data.root).resolve()
    if folder.is_relative_to(site_root) or site_root.is_relative_to(folder):
        raise ConfigError(
            f"compression.calibration.folder {calibration.folder} overlaps the run's data.root {config.data.root}: "
            "calibration must use public or synthetic images, never site data"
        )
    if not _calibration_records(calibration):
        raise ConfigError(f"compression.calibration.folder {calibration.folder} holds no readable mammograms")


def calibration_images(config: ExperimentConfig, calibration: CalibrationConfig) -> np.ndarray:
    """Up to `calibration.images` server-held images [K, 1, S, S] float32, preprocessed as the run's data."""
    if calibration.source == "folder":
        return _arrays(_sample(_calibration_records(calibration), calibration), config)
    with tempfile.TemporaryDirectory(prefix="mammofl-calibration-") as folder:
        root = Path(folder) / "synthetic"
        ensure_synthetic(root, _synthetic_like_the_sites(config, calibration))
        records = [record for site in load_site_folders(root).values() for record in site]
        return _arrays(records, config)


def held_out_test_set(config: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
    """The run's held-out test images [N, 1, S, S] float32 and labels [N], in a fixed order."""
    splits = centralised_splits(load_records(config.data), config)
    images, labels = [], []
    for batch_images, batch_labels in make_loader(splits.test, config, train=False):
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(images), np.concatenate(labels)


def _calibration_records(calibration: CalibrationConfig) -> list[ImageRecord]:
    try:
        return load_cbis_ddsm(calibration.folder)
    except DataError as error:
        raise ConfigError(
            f"compression.calibration.folder {calibration.folder} is not a readable CBIS-DDSM tree: {error}"
        ) from error


def _sample(records: list[ImageRecord], calibration: CalibrationConfig) -> list[ImageRecord]:
    """`calibration.images` records drawn without replacement under `calibration.seed`."""
    order = np.random.default_rng(calibration.seed).permutation(len(records))
    return [records[index] for index in order[: calibration.images]]


def _synthetic_like_the_sites(config: ExperimentConfig, calibration: CalibrationConfig) -> SyntheticDataConfig:
    """The sites' generator settings when their data is synthetic (so the images look alike),
    with the calibration's own seed and count; otherwise the generator's defaults."""
    base = config.data.synthetic if config.data.source == "synthetic" else SyntheticDataConfig(size=DEFAULT_SYNTHETIC_ROWS)
    return base.model_copy(update={"sites": 1, "per_site": calibration.images, "seed": calibration.seed})


def _arrays(records: list[ImageRecord], config: ExperimentConfig) -> np.ndarray:
    dataset = MammogramDataset(records, image_size=config.model.image_size, mode=config.data.mode)
    return torch.stack([dataset[index][0] for index in range(len(dataset))]).numpy()
