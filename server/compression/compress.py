"""`compress_run`: every configured variant of a finished run, built, measured, reported, published.

The aggregator calls it as its last step and ``mammofl compress RUN_DIR`` calls it on any
run with ``model/best.pt``. All checks that can fail on the input (the run's files, the
calibration source) run before the first model is touched. Each variant is measured from
the file it will be served from, on the run's own held-out test split, and only then
published to ``serving/<variant>/`` together with its metadata.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from common.config import (
    BASELINE_VARIANT,
    CompressionConfig,
    ExperimentConfig,
    load_config,
)
from common.data.records import CLASS_NAMES
from common.errors import ModelError
from common.metrics import bootstrap_intervals, classification_metrics, unusable_because
from common.models.classifier import load_checkpoint
from server.compression.build import BuiltVariant, VariantBuilder
from server.compression.datasets import (
    calibration_images,
    check_calibration_source,
    held_out_test_set,
)
from server.compression.measure import (
    Speed,
    measure_speed,
    parameter_counts,
    predict_in_batches,
    torch_threads,
)
from server.compression.report import (
    REPORT_METRICS,
    VERDICT_METRICS,
    CompressionReport,
    VariantResult,
    finite_or_none,
    write_report,
)
from server.compression.serving import (
    Preprocessing,
    ServingMetadata,
    SourceRun,
    open_model_file,
    sha256_of,
    write_metadata,
)
from server.compression.variants import RECIPES
from server.model_card import write_model_cards

CHECKPOINT = Path("model") / "best.pt"
SERVING_DIR, COMPRESSION_DIR = "serving", "compression"


@dataclass(frozen=True)
class _Measured:
    """A variant's model file, predictions on the test split and speed, before publication."""

    name: str
    built: BuiltVariant
    probs: np.ndarray
    metrics: dict[str, float | None]
    speed: Speed
    file_bytes: int


def compress_run(run_dir: Path, settings: CompressionConfig, *, log: Callable[[str], None] = print) -> CompressionReport:
    """Build, measure and publish `settings.variants` of the run in `run_dir`; write its report."""
    run_dir = Path(run_dir)
    config = _checked_run(run_dir)
    check_compression(config, settings)
    model, _ = load_checkpoint(run_dir / CHECKPOINT)
    images, labels = held_out_test_set(config)
    calibration = calibration_images(config, settings.calibration)
    log(f"compressing run {run_dir.name}: {len(images)} test images, {len(calibration)} calibration images")
    source = SourceRun(run_id=run_dir.name, checkpoint=CHECKPOINT.as_posix(),
                       checkpoint_sha256=sha256_of(run_dir / CHECKPOINT))
    results = []
    intervals: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mammofl-compress-") as work:
        builder = VariantBuilder(model, calibration, settings, config.model.image_size, Path(work))
        staging = Path(work) / "variants"
        baseline = _measure(BASELINE_VARIANT, builder, images, labels, settings, staging)
        others = (name for name in settings.variants if name != BASELINE_VARIANT)
        for measured in chain([baseline], (_measure(name, builder, images, labels, settings, staging) for name in others)):
            result = _result(measured, baseline)
            _publish(measured, result, config, source, run_dir / SERVING_DIR)
            log(_progress_line(result))
            results.append(result)
            intervals[measured.name] = bootstrap_intervals(labels, measured.probs)
    report = _report(run_dir, settings, calibration, len(images), results)
    write_report(report, run_dir / COMPRESSION_DIR)
    # Every served variant carries its model card (`server.model_card`), which `mammofl serve` checks.
    write_model_cards(run_dir, intervals=intervals)
    return report


def check_compression(config: ExperimentConfig, settings: CompressionConfig) -> None:
    """Raise ConfigError now for a request that could only fail later (no usable calibration data).

    A federated run calls this before its first round, so a bad request never costs a training.
    """
    check_calibration_source(config, settings.calibration)


def _checked_run(run_dir: Path) -> ExperimentConfig:
    """The run's configuration, once its config and checkpoint are known to exist."""
    if not run_dir.is_dir():
        raise ModelError(f"run directory {run_dir} does not exist; give a runs/<run_id> folder")
    if not (run_dir / CHECKPOINT).is_file():
        raise ModelError(f"{run_dir / CHECKPOINT}: no trained model; compress a finished run (it writes {CHECKPOINT})")
    return load_config(run_dir / "config.json")


def _measure(name: str, builder: VariantBuilder, images: np.ndarray, labels: np.ndarray,
             settings: CompressionConfig, staging: Path) -> _Measured:
    recipe = RECIPES[name]
    built = builder.build(recipe, staging / name)
    predict = open_model_file(built.model_file, recipe.backend, threads=settings.threads)
    with torch_threads(settings.threads):
        probs = predict_in_batches(predict, images, settings.throughput_batch)
        speed = measure_speed(predict, images, latency_runs=settings.latency_runs, batch=settings.throughput_batch,
                              batch_runs=settings.throughput_runs)
    metrics = {key: finite_or_none(value) for key, value in classification_metrics(labels, probs).items()}
    return _Measured(name, built, probs, metrics, speed, built.model_file.stat().st_size)


def _result(measured: _Measured, baseline: _Measured) -> VariantResult:
    recipe = RECIPES[measured.name]
    nonzero, total = parameter_counts(measured.built.module)
    return VariantResult(
        variant=measured.name,
        description=recipe.description,
        backend=recipe.backend,
        precision=recipe.precision,
        pruning=recipe.pruning,
        metrics={key: measured.metrics[key] for key in (*REPORT_METRICS, *VERDICT_METRICS)},
        change={key: _difference(measured.metrics[key], baseline.metrics[key]) for key in REPORT_METRICS},
        agreement_with_fp32=float((measured.probs.argmax(1) == baseline.probs.argmax(1)).mean()),
        file_bytes=measured.file_bytes,
        size_ratio=baseline.file_bytes / measured.file_bytes,
        nonzero_parameters=nonzero,
        total_parameters=total,
        latency_ms_p50=measured.speed.latency_ms_p50,
        latency_ms_p95=measured.speed.latency_ms_p95,
        throughput_images_per_s=measured.speed.throughput_images_per_s,
        speedup=baseline.speed.latency_ms_p50 / measured.speed.latency_ms_p50,
        serving_dir=f"{SERVING_DIR}/{measured.name}",
    )


def _difference(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def _publish(measured: _Measured, result: VariantResult, config: ExperimentConfig, source: SourceRun,
             serving_root: Path) -> None:
    """Write the metadata beside the model file, then swap the folder into ``serving/<variant>``."""
    staged = measured.built.model_file.parent
    write_metadata(staged, ServingMetadata(
        variant=measured.name,
        backend=result.backend,
        precision=result.precision,
        pruning=result.pruning,
        model_file=measured.built.model_file.name,
        sha256=sha256_of(measured.built.model_file),
        class_names=CLASS_NAMES,
        preprocessing=Preprocessing(mode=config.data.mode, image_size=config.model.image_size),
        metrics=measured.metrics,
        source_run=source,
    ))
    target = serving_root / measured.name
    if target.exists():
        shutil.rmtree(target)
    serving_root.mkdir(parents=True, exist_ok=True)
    shutil.move(staged, target)


def _report(run_dir: Path, settings: CompressionConfig, calibration: np.ndarray, test_images: int,
            results: list[VariantResult]) -> CompressionReport:
    origin = settings.calibration
    return CompressionReport(
        run_id=run_dir.name,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        test_images=test_images,
        calibration={"source": origin.source, "images": len(calibration),
                     **({"seed": origin.seed} if origin.source == "synthetic" else {"folder": str(origin.folder)})},
        threads=settings.threads,
        throughput_batch=settings.throughput_batch,
        environment={"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "machine": platform.machine(), "python": platform.python_version()},
        variants=tuple(results),
    )


def _progress_line(result: VariantResult) -> str:
    accuracy = result.metrics["accuracy"]
    failure = unusable_because(result.metrics)
    return (f"  {result.variant}: accuracy {accuracy:.3f}, agrees with fp32 {result.agreement_with_fp32:.1%}, "
            f"{result.file_bytes / 1e6:.2f} MB, p50 {result.latency_ms_p50:.2f} ms"
            + (f" -- FAILED: it {failure}" if failure else ""))
