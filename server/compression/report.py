"""The compression report of a run: ``runs/<id>/compression/report.json``, ``report.md`` and plots.

It answers the research question "does lower precision or sparsity hurt detecting a
tumour and its type?" per variant: the four test metrics and their change against fp32,
how often the variant's predicted class agrees with fp32's, and what it saves (file size,
non-zero parameters, CPU latency and throughput). Every number of one report was measured
in one process run on one machine.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict

from common.errors import ModelError
from common.metrics import unusable_because

REPORT_METRICS = ("accuracy", "macro_auc", "presence_auc", "type_auc")
# Stored beside them, unchanged-compared: what says whether a variant is a classifier at all.
VERDICT_METRICS = ("balanced_accuracy", "predicted_classes")
REPORT_JSON, REPORT_MD = "report.json", "report.md"
METRIC_PLOT, COST_PLOT = "metric_changes.png", "latency_vs_size.png"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariantResult(_Record):
    """One variant as served: its quality on the test split and what it costs.

    `change` is this variant's metric minus fp32's (None where either is undefined);
    `size_ratio` and `speedup` are fp32's file size and p50 latency over this variant's.
    """

    variant: str
    description: str
    backend: str
    precision: str
    pruning: str
    metrics: dict[str, float | None]
    change: dict[str, float | None]
    agreement_with_fp32: float
    file_bytes: int
    size_ratio: float
    nonzero_parameters: int
    total_parameters: int
    latency_ms_p50: float
    latency_ms_p95: float
    throughput_images_per_s: float
    speedup: float
    serving_dir: str


class CompressionReport(_Record):
    run_id: str
    created_at: str
    test_images: int
    calibration: dict[str, str | int]
    threads: int
    throughput_batch: int
    environment: dict[str, str]
    variants: tuple[VariantResult, ...]

    def variant(self, name: str) -> VariantResult:
        for result in self.variants:
            if result.variant == name:
                return result
        raise ModelError(f"run {self.run_id}: no compression result for variant {name!r}; "
                         f"measured: {', '.join(r.variant for r in self.variants)}")

    def markdown_table(self) -> str:
        """One row per variant; what the experiment runner puts into its comparison."""
        header = (
            "| variant | backend | accuracy (Δ) | macro AUC (Δ) | presence AUC (Δ) | type AUC (Δ) | agrees with fp32 "
            f"| size MB (÷) | non-zero params | p50 ms | p95 ms | img/s @{self.throughput_batch} | speed-up |\n"
            + "|---" * 13 + "|"
        )
        return "\n".join([header, *(_table_row(result) for result in self.variants)])


def finite_or_none(value: float) -> float | None:
    """NaN (an undefined AUC) and infinities become None, which JSON can hold."""
    return value if math.isfinite(value) else None


def write_report(report: CompressionReport, out_dir: Path) -> None:
    """report.json, report.md and the two plots, into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(report.model_dump_json(indent=2) + "\n")
    _plot_metric_changes(report, out_dir / METRIC_PLOT)
    _plot_costs(report, out_dir / COST_PLOT)
    (out_dir / REPORT_MD).write_text(_markdown(report))


def read_report(run_dir: Path) -> CompressionReport | None:
    """The run's compression report, or None when compression has not run for it."""
    path = Path(run_dir) / "compression" / REPORT_JSON
    if not path.is_file():
        return None
    return CompressionReport.model_validate_json(path.read_text())


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_change(result: VariantResult, metric: str) -> str:
    change = result.change.get(metric)
    return f"{_number(result.metrics.get(metric))} ({'n/a' if change is None else f'{change:+.3f}'})"


def _table_row(result: VariantResult) -> str:
    cells = [
        result.variant,
        result.backend,
        *(_with_change(result, metric) for metric in REPORT_METRICS),
        f"{result.agreement_with_fp32:.1%}",
        f"{result.file_bytes / 1e6:.2f} ({result.size_ratio:.1f}x)",
        f"{result.nonzero_parameters:,} / {result.total_parameters:,}",
        f"{result.latency_ms_p50:.2f}",
        f"{result.latency_ms_p95:.2f}",
        f"{result.throughput_images_per_s:.1f}",
        f"{result.speedup:.2f}x",
    ]
    return "| " + " | ".join(cells) + " |"


def _failures(report: CompressionReport) -> str:
    """A plain line for every variant that is no usable classifier (fp32's makes agreement meaningless)."""
    lines = []
    for result in report.variants:
        failure = unusable_because(result.metrics)
        if failure:
            consequence = " Agreement with it says nothing about the other variants." if result.variant == "fp32" else ""
            lines.append(f"**FAILED: `{result.variant}` {failure}.**{consequence}")
    return "\n\n".join(lines) + "\n" if lines else ""


def _markdown(report: CompressionReport) -> str:
    descriptions = "\n".join(f"- `{r.variant}`: {r.description}" for r in report.variants)
    environment = ", ".join(f"{key} {value}" for key, value in sorted(report.environment.items()))
    calibration = ", ".join(f"{key} {value}" for key, value in report.calibration.items())
    return f"""# Compression report: run `{report.run_id}`

Test split: {report.test_images} held-out images. Calibration (server-held): {calibration}.
Timed on CPU with {report.threads} thread(s), all variants in one process ({environment}).
Δ is the change against `fp32`; size and speed-up are fp32's size and p50 latency over the variant's.

{_failures(report)}
{report.markdown_table()}

{descriptions}

![metric changes]({METRIC_PLOT})
![latency and size]({COST_PLOT})
"""


def _plot_metric_changes(report: CompressionReport, path: Path) -> None:
    figure = Figure(figsize=(max(6.0, 1.1 * len(report.variants)), 4), layout="tight")
    axes = figure.subplots()
    width = 0.8 / len(REPORT_METRICS)
    for index, metric in enumerate(REPORT_METRICS):
        changes = [result.change.get(metric) or 0.0 for result in report.variants]
        positions = [position + (index - 1.5) * width for position in range(len(report.variants))]
        axes.bar(positions, changes, width, label=metric)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(report.variants)), [r.variant for r in report.variants], rotation=30, ha="right")
    axes.set_ylabel("change against fp32")
    axes.set_title("Change of the test metrics against fp32")
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def _plot_costs(report: CompressionReport, path: Path) -> None:
    figure = Figure(figsize=(6, 4.5), layout="tight")
    axes = figure.subplots()
    for result in report.variants:
        axes.scatter(result.file_bytes / 1e6, result.latency_ms_p50)
        axes.annotate(result.variant, (result.file_bytes / 1e6, result.latency_ms_p50), fontsize="small")
    axes.set_xlabel("file size (MB)")
    axes.set_ylabel("latency p50 at batch 1 (ms)")
    axes.set_title("Cost per variant (lower left is cheaper)")
    figure.savefig(path, dpi=120)
