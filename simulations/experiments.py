"""``mammofl experiments CONFIG...``: run several configs one after another and compare them.

Each config runs the way its ``training`` key says (centralised or federated), is tracked
like any run, and contributes one row to the comparison table printed at the end and
written to ``<runs_dir>/comparison-<stamp>.md`` (and ``.json``). A config that fails is
reported in its row; the others still run. Runs whose config enables ``compression`` add
their variants to a second table: what each precision and sparsity costs against fp32.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.config import ExperimentConfig, load_config
from common.errors import ConfigError, MammoflError
from common.runs import RunDirectory, json_safe
from server.compression import VariantResult, read_report

COLUMNS = ("accuracy", "balanced_accuracy", "macro_auc", "presence_auc", "type_auc")


@dataclass(frozen=True)
class ExperimentRow:
    name: str
    source: str
    training: str
    private: str
    augmentation: str
    metrics: dict[str, float]
    max_epsilon: float | None
    seconds: float
    run_dir: str | None
    error: str | None = None
    compression: tuple[VariantResult, ...] = ()


def expand_config_paths(paths: list[Path]) -> list[Path]:
    """Files as given; a folder stands for the ``*.json`` files in it, sorted."""
    expanded: list[Path] = []
    for path in paths:
        if path.is_dir():
            expanded += sorted(path.glob("*.json"))
        elif path.is_file():
            expanded.append(path)
        else:
            raise ConfigError(f"{path}: no such config file or folder")
    if not expanded:
        raise ConfigError(f"no config files in {', '.join(map(str, paths))}")
    return expanded


def run_experiments(paths: list[Path], *, log=print) -> list[ExperimentRow]:
    """Validate every config first (nothing runs if one is invalid), then run them in order."""
    configs = [(path, load_config(path)) for path in expand_config_paths(paths)]
    rows = []
    for path, config in configs:
        log(f"== {path} ({config.training})")
        rows.append(_run_one(path, config))
    return rows


def _run_one(path: Path, config: ExperimentConfig) -> ExperimentRow:
    started = time.perf_counter()
    try:
        run, metrics = _train(config)
        error = None
    except MammoflError as exc:
        run, metrics, error = None, {}, str(exc).splitlines()[0]
    return ExperimentRow(
        name=config.name,
        source=str(path),
        training=config.training,
        private=_privacy_label(config),
        augmentation=f"{config.augmentation.strength:g}" if config.augmentation.enabled else "off",
        metrics=metrics,
        max_epsilon=_max_epsilon(run) if run else None,
        seconds=round(time.perf_counter() - started, 1),
        run_dir=str(run.root) if run else None,
        error=error,
        compression=_compression_results(run),
    )


def _train(config: ExperimentConfig) -> tuple[RunDirectory, dict[str, float]]:
    if config.training == "federated":
        from simulations.federated import simulate

        result = simulate(config)
        final = result.final_metrics
        return result.run, {name: final.get(f"test_{name}", math.nan) for name in COLUMNS}
    from simulations.centralised import train_centralised

    result = train_centralised(config)
    return result.run, {name: result.test_metrics[name] for name in COLUMNS}


def _privacy_label(config: ExperimentConfig) -> str:
    privacy = config.privacy
    if not privacy.enabled:
        return "none"
    if privacy.target_epsilon is not None:
        return f"eps {privacy.target_epsilon:g}"
    return f"sigma {privacy.noise_multiplier:g}"


def _max_epsilon(run: RunDirectory) -> float | None:
    report = run.root / "privacy" / "report.json"
    if not report.exists():
        return None
    return max((site["epsilon"] for site in json.loads(report.read_text())["sites"]), default=None)


def _compression_results(run: RunDirectory | None) -> tuple[VariantResult, ...]:
    report = read_report(run.root) if run else None
    return report.variants if report else ()


def compression_table(rows: list[ExperimentRow]) -> str | None:
    """Every compressed variant of every experiment against its own fp32; None when none compressed."""
    header = ("| experiment | variant | backend | accuracy | Δ accuracy | Δ macro AUC | agrees with fp32 "
              "| size ÷ | p50 ms | speed-up |")
    lines = [header, "|---" * 10 + "|"]
    for row in rows:
        for result in row.compression:
            lines.append(f"| {row.name} | {result.variant} | {result.backend} | {_cell(result.metrics.get('accuracy'))} "
                         f"| {_cell(result.change.get('accuracy'))} | {_cell(result.change.get('macro_auc'))} "
                         f"| {result.agreement_with_fp32:.3f} | {result.size_ratio:.2f} | {result.latency_ms_p50:.2f} "
                         f"| {result.speedup:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else None


def comparison_table(rows: list[ExperimentRow]) -> str:
    header = "| experiment | training | DP | augmentation | " + " | ".join(COLUMNS) + " | max site epsilon | seconds |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 6)]
    for row in rows:
        if row.error:
            lines.append(f"| {row.name} | {row.training} | {row.private} | {row.augmentation} | failed: {row.error} |")
            continue
        values = " | ".join(_cell(row.metrics.get(name)) for name in COLUMNS)
        lines.append(f"| {row.name} | {row.training} | {row.private} | {row.augmentation} | {values} "
                     f"| {_cell(row.max_epsilon)} | {row.seconds:g} |")
    return "\n".join(lines)


def write_comparison(rows: list[ExperimentRow], runs_dir: Path) -> Path:
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = runs_dir / f"comparison-{stamp}.md"
    text = "# Experiment comparison (test split)\n\n" + comparison_table(rows) + "\n"
    compressed = compression_table(rows)
    if compressed:
        text += "\n## Compression (each variant against its run's fp32)\n\n" + compressed + "\n"
    target.write_text(text)
    documents = [{**row.__dict__, "compression": [result.model_dump() for result in row.compression]} for row in rows]
    target.with_suffix(".json").write_text(json.dumps(json_safe(documents), indent=2) + "\n")
    return target


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"
