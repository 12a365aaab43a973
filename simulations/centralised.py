"""The centralised baseline (``mammofl train CONFIG``): all sites' data pooled in one place.

It is the upper bound a federated run is compared against, and the simplest reading of
the reference config: train, validate every epoch, keep the best model by the monitored
value, test it once on the held-out split.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from common.callbacks import EarlyStopping, ModelCheckpoint
from common.config import ExperimentConfig
from common.data.features import ViewsLoss, evaluation_input, view_training_data
from common.data.pipeline import (
    Splits,
    centralised_splits,
    class_counts,
    load_records,
    make_loader,
)
from common.data.records import CLASS_NAMES
from common.losses import build_loss
from common.metrics import unusable_because
from common.models.classifier import load_checkpoint, save_checkpoint
from common.models.configured import classifier_from_config, freeze_schedule_from_config
from common.runs import RunDirectory
from common.training import (
    build_optimizer,
    evaluate,
    seed_everything,
    select_device,
    show_progress,
    train_one_epoch,
)
from server.compression import check_compression, compress_run
from simulations.tracking import Tracker


@dataclass(frozen=True)
class TrainResult:
    run: RunDirectory
    test_metrics: dict[str, float]
    best_epoch: int | None
    epochs_run: int


def train_centralised(config: ExperimentConfig, *, log=print) -> TrainResult:
    """Train, validate and test as configured; everything lands in a new run directory."""
    generator = seed_everything(config.seed)
    device = select_device(config.device)
    progress = show_progress(config.verbose)
    records = load_records(config.data, progress=progress)
    splits = centralised_splits(records, config)
    if config.compression.enabled:
        check_compression(config, config.compression)
    run = RunDirectory.create(config.tracking.runs_dir, config.name)
    run.write_config(config)
    tracker = Tracker(config, run)
    if config.verbose:
        log(f"run {run.run_id}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images")

    model = classifier_from_config(config).to(device)
    optimizer = build_optimizer(
        config.optimizer, model.parameters(), learning_rate=config.learning_rate, weight_decay=config.weight_decay
    )
    loss_fn = build_loss(config.loss, class_counts(splits.train)).to(device)
    freeze = freeze_schedule_from_config(config)
    checkpoint = ModelCheckpoint(config.checkpoint, run.model_dir)
    stopper = EarlyStopping(config.early_stopping) if config.early_stopping else None
    # An encoder frozen for the whole run (or without parameters) computes its features once
    # (`common.data.features`): the epochs train the head on them.
    if not model.encoder.trainable or config.model.freeze.head_only_epochs >= config.epochs:
        freeze.apply(model, 0)
        trained, train_loader = view_training_data(model, splits.train, config, device=device, shuffle=True,
                                                   generator=generator)
        train_loss_fn = ViewsLoss(loss_fn)
    else:
        trained, train_loss_fn = model, loss_fn
        train_loader = make_loader(splits.train, config, train=True, generator=generator)
    validated, val_loader = evaluation_input(model, splits.val or splits.train, config, device=device)

    def save(path: Path, include_optimizer: bool, epoch: int, metrics: dict[str, float]) -> None:
        extra = {"epoch": epoch, "metrics": metrics, "class_names": list(CLASS_NAMES),
                 "image_size": config.model.image_size}
        if include_optimizer:
            extra["optimizer_state"] = optimizer.state_dict()
        save_checkpoint(model, path, **extra)

    epoch = 0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        freeze.apply(model, epoch - 1)
        train_loss = train_one_epoch(
            trained, train_loader, optimizer, train_loss_fn, device=device, progress=progress,
            description=f"epoch {epoch}"
        )
        val_metrics = evaluate(validated, val_loader, loss_fn, device=device)
        metrics = {"train_loss": train_loss, **{f"val_{key}": value for key, value in val_metrics.items()}}
        run.log_metrics({"epoch": epoch, "seconds": round(time.perf_counter() - started, 3), **metrics})
        tracker.log_epoch(epoch, metrics)
        if config.verbose:
            log(_epoch_line(epoch, config, metrics))
        checkpoint.update(epoch, metrics, lambda path, opt: save(path, opt, epoch, metrics))
        if stopper is not None and stopper.should_stop(metrics):
            if config.verbose:
                log(f"early stopping after epoch {epoch}: {stopper.config.monitor} has not improved "
                    f"for {stopper.config.patience} epochs")
            break
    save(run.model_dir / "last.pt", True, epoch, metrics)

    test_metrics = _test_best_model(config, run, splits, checkpoint, device, loss_fn)
    run.log_metrics({"split": "test", "best_epoch": checkpoint.best_step, **test_metrics})
    exported = _export(config, run, checkpoint)
    tracker.log_epoch(epoch + 1, {f"test_{key}": value for key, value in test_metrics.items()})
    tracker.finish(exported)
    run.summary_path.write_text(_summary(config, run, splits, test_metrics, checkpoint.best_step, epoch, exported))
    if config.compression.enabled:
        compress_run(run.root, config.compression, log=log)
    return TrainResult(run=run, test_metrics=test_metrics, best_epoch=checkpoint.best_step, epochs_run=epoch)


def _test_best_model(config, run, splits: Splits, checkpoint: ModelCheckpoint, device, loss_fn) -> dict[str, float]:
    best_path = checkpoint.best_path if checkpoint.best_path.exists() else run.model_dir / "last.pt"
    model, _ = load_checkpoint(best_path)
    return evaluate(*evaluation_input(model.to(device), splits.test, config, device=device), loss_fn, device=device)


def _export(config: ExperimentConfig, run: RunDirectory, checkpoint: ModelCheckpoint) -> Path:
    """Copy the chosen model to ``model_save_dir`` under the ModelCheckpoint filepath's name."""
    source = checkpoint.best_path if checkpoint.best_path.exists() else run.model_dir / "last.pt"
    target = run.root / config.model_save_dir / Path(config.checkpoint.filepath).with_suffix(".pt").name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def _epoch_line(epoch: int, config: ExperimentConfig, metrics: dict[str, float]) -> str:
    shown = ["train_loss", "val_loss"] + [f"val_{name}" for name in config.metrics if f"val_{name}" in metrics]
    return f"epoch {epoch}/{config.epochs} " + " ".join(f"{key}={metrics[key]:.4f}" for key in shown)


SUMMARY_METRICS = (
    "accuracy", "balanced_accuracy", "macro_auc", "presence_auc", "type_auc",
    *(f"{rate}_{name}" for name in CLASS_NAMES for rate in ("sensitivity", "specificity")),
)


def _summary(config, run, splits, test_metrics, best_epoch, epochs_run, exported) -> str:
    rows = "\n".join(f"| {name} | {test_metrics[name]:.4f} |" for name in SUMMARY_METRICS)
    chance = 1.0 / len(CLASS_NAMES)
    failure = unusable_because(test_metrics)
    verdict = f"\n\n**FAILED: the model {failure}.**" if failure else ""
    return f"""# Centralised training: {config.name}

Run `{run.run_id}`; encoder `{config.encoder}` ({config.norm} norm), {config.model.image_size} px,
augmentation {'on (strength ' + str(config.augmentation.strength) + ')' if config.augmentation.enabled else 'off'},
{epochs_run} of {config.epochs} epochs, best epoch by `{config.checkpoint.monitor}`: {best_epoch}.

Images: {len(splits.train)} train, {len(splits.val)} validation, {len(splits.test)} test (held-out split).

## Test metrics (best model)

| metric | value |
|---|---|
{rows}

Chance level: accuracy {chance:.2f}, AUCs 0.50.{verdict}

## Files

- resolved config: `config.json`
- per-epoch metrics: `metrics.jsonl`
- checkpoints: `model/best.pt`, `model/last.pt`
- exported model: `{exported.relative_to(run.root)}`
"""
