"""``mammofl pretrain CONFIG``: the configured encoder learns the look of mammograms unlabeled.

The pool is the training split of the configured data with labels ignored (the held-out
test split never takes part, so later test numbers stay honest), or, with
``pretraining.source: "public"``, a synthetic set that belongs to no site.
"""

from __future__ import annotations

from pathlib import Path

from common.config import ExperimentConfig
from common.data.cbis import load_site_folders
from common.data.dataset import MammogramDataset
from common.data.pipeline import ensure_synthetic, load_records
from common.data.records import ImageRecord
from common.errors import ConfigError
from common.models.encoders import build_encoder
from common.pretraining import FeatureStatistics, PretrainResult, measure_feature_statistics, pretrain_autoencoder
from common.training import seed_everything, select_device, show_progress


def pretrain_from_config(config: ExperimentConfig, *, out_path: Path | None = None
                         ) -> PretrainResult | FeatureStatistics:
    """Pretrain and write the encoder to `out_path` (default: the config's ``model.pretrained``).

    An encoder without parameters (``scattering``) learns nothing but the statistics that
    standardise its features; those are measured on the pool instead.
    """
    target = out_path or config.model.pretrained
    if target is None:
        raise ConfigError("pretraining needs a place for the encoder: set model.pretrained or pass --out")
    seed_everything(config.seed)
    progress = show_progress(config.verbose)
    pool = _pretraining_pool(config, progress=progress)
    dataset = MammogramDataset(
        pool, image_size=config.model.image_size, mode=config.data.mode, cache_dir=config.data.cache_dir
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    if not build_encoder(config.encoder, norm=config.norm).trainable:
        return measure_feature_statistics(
            dataset, encoder_name=config.encoder, norm=config.norm, batch_size=config.pretraining.batch_size,
            out_path=target, device=select_device(config.device), num_workers=config.num_workers,
            source=config.pretraining.source, source_detail=_pool_description(config))
    return pretrain_autoencoder(
        dataset,
        encoder_name=config.encoder,
        norm=config.norm,
        epochs=config.pretraining.epochs,
        batch_size=config.pretraining.batch_size,
        learning_rate=config.pretraining.learning_rate,
        seed=config.seed,
        out_path=target,
        device=select_device(config.device),
        num_workers=config.num_workers,
        progress=progress,
        source=config.pretraining.source,
        source_detail=_pool_description(config),
    )


def _pool_description(config: ExperimentConfig) -> str:
    if config.pretraining.source == "public":
        public = config.pretraining.public
        return f"synthetic public stand-in set, seed {public.seed}, {public.per_site} images, in {config.pretraining.public_root}"
    return f"training split of {config.data.source} data in {config.data.root}"


def _pretraining_pool(config: ExperimentConfig, *, progress: bool) -> list[ImageRecord]:
    pretraining = config.pretraining
    if pretraining.source == "public":
        if config.data.source == "synthetic" and pretraining.public.seed == config.data.synthetic.seed:
            raise ConfigError(f"pretraining.public.seed {pretraining.public.seed} equals data.synthetic.seed: the "
                              "'public' images would be the sites' own; choose another seed")
        ensure_synthetic(pretraining.public_root, pretraining.public, progress=progress)
        return [record for site in load_site_folders(pretraining.public_root).values() for record in site]
    if config.training == "federated":
        raise ConfigError("pretraining.source 'training-data' would pool the sites' images, which a federated "
                          "config keeps at the sites; set pretraining.source to 'public'")
    return [record for record in load_records(config.data, progress=progress) if record.split == "train"]

