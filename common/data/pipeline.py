"""From a ``data`` config section to records, splits and DataLoaders.

The one place where a configured source (our synthetic generator, a CBIS-DDSM tree, or
a folder of site trees) becomes ``ImageRecord`` lists; centralised training and every
federated site start here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common.config import DataConfig, ExperimentConfig, SyntheticDataConfig
from common.data.cbis import load_cbis_ddsm, load_site_folders
from common.data.dataset import MammogramDataset
from common.data.partition import partition_records, split_train_val
from common.data.records import CLASS_NAMES, ImageRecord
from common.data.synthetic_dicom import synthesize_dataset
from common.data.transforms import build_train_transform
from common.errors import ConfigError


@dataclass(frozen=True)
class Splits:
    """Train and validation come from the source's training split; test is its held-out split."""

    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]


def load_records(data: DataConfig, *, progress: bool = False) -> list[ImageRecord]:
    """Every record of the configured source, train and test split alike."""
    if data.source == "synthetic":
        ensure_synthetic(data.root, data.synthetic, progress=progress)
    if data.source == "cbis-ddsm":
        return load_cbis_ddsm(data.root, layout=data.layout, skip_missing=data.skip_missing)
    sites = load_site_folders(data.root, layout=data.layout, skip_missing=data.skip_missing)
    return [record for records in sites.values() for record in records]


def ensure_synthetic(root: Path, synthetic: SyntheticDataConfig, *, progress: bool = False) -> None:
    """Generate the configured synthetic set into `root` unless it is already there.

    An existing set made with other parameters is never overwritten: that would silently
    change the data of earlier runs that point at the same folder.
    """
    manifest_path = root / "manifest.json"
    wanted = synthetic.model_dump()
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        made_with = {key: manifest.get(key) for key in wanted} | {"sites": len(manifest.get("sites", {}))}
        if made_with != wanted:
            raise ConfigError(
                f"data.root {root} holds synthetic data made with {made_with}, but data.synthetic "
                f"asks for {wanted}; choose another data.root or delete the folder"
            )
        return
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"data.root {root} exists, is not empty and holds no manifest.json; choose an empty folder")
    synthesize_dataset(root, progress=progress, **wanted)


def centralised_splits(records: list[ImageRecord], config: ExperimentConfig) -> Splits:
    train_pool = [record for record in records if record.split == "train"]
    test = [record for record in records if record.split == "test"]
    if not train_pool or not test:
        raise ConfigError(
            f"data.root {config.data.root}: need both train and test records, found "
            f"{len(train_pool)} train and {len(test)} test"
        )
    train, val = split_train_val(train_pool, config.validation_split, seed=config.seed)
    return Splits(train=train, val=val, test=test)


def site_partitions(records: list[ImageRecord], config: ExperimentConfig) -> dict[str, list[ImageRecord]]:
    """The training-split records of each site, per ``data.partition``."""
    partition = config.data.partition
    train_pool = [record for record in records if record.split == "train"]
    return partition_records(
        train_pool, partition.scheme, partition.num_sites or 0, alpha=partition.alpha, seed=partition.seed
    )


def class_counts(records: list[ImageRecord]) -> list[int]:
    return [sum(record.label == index for record in records) for index in range(len(CLASS_NAMES))]


def make_loader(
    records: list[ImageRecord],
    config: ExperimentConfig,
    *,
    train: bool,
    generator: torch.Generator | None = None,
    num_workers: int | None = None,
) -> DataLoader:
    """A DataLoader over `records`; augmentation and shuffling only for training.

    `num_workers` overrides the config's (0: read in this process).
    """
    workers = config.num_workers if num_workers is None else num_workers
    transform = (
        build_train_transform(config.augmentation.strength, enabled=config.augmentation.enabled)
        if train
        else None
    )
    dataset = MammogramDataset(
        records,
        image_size=config.model.image_size,
        transform=transform,
        mode=config.data.mode,
        cache_dir=config.data.cache_dir,
    )
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=train and config.shuffle,
        num_workers=workers,
        generator=generator,
        persistent_workers=workers > 0,
        # Workers start from a clean server process, not a fork of this one: a forked copy of a
        # process running gRPC threads (a deployed ClientApp talks gRPC to its SuperNode) crashes
        # in gRPC's event engine, which is how a deployed site lost its round to "DataLoader
        # worker exited unexpectedly".
        multiprocessing_context="forkserver" if workers > 0 else None,
    )
