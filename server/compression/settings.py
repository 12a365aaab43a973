"""The ``compression`` config section: which variants to build and how to measure them.

Written to move as is into `common.config` (as ``CompressionConfig``); until then the
server validates a run's compression request with this model. Every field that could make
the work fail later (an unknown variant, a sparsity outside (0, 1), a calibration folder
that is not given) fails here, at validation, before a model is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import ConfigError

# Every variant compress_run can build; `server.compression.variants.RECIPES` says how.
VARIANT_NAMES: tuple[str, ...] = (
    "fp32",
    "fp16",
    "bf16",
    "onnx_fp32",
    "int8_dynamic",
    "int8_static",
    "int8_qat",
    "pruned_unstructured",
    "pruned_structured",
    "pruned_structured_onnx",
    "pruned_structured_int8",
)
BASELINE_VARIANT = "fp32"
DEFAULT_VARIANTS: tuple[str, ...] = tuple(name for name in VARIANT_NAMES if name != "int8_qat")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(_Section):
    """Server-held images for int8 calibration and the short fine-tunes: never site data.

    "synthetic" renders `images` mammograms with our generator under `seed`, which must
    differ from the seed of the sites' synthetic data; "folder" reads a public CBIS-DDSM
    tree at `folder` (it must lie outside the run's ``data.root``).
    """

    source: Literal["synthetic", "folder"] = "synthetic"
    folder: Path | None = None
    images: int = Field(default=64, ge=4, le=4096)
    seed: int = Field(default=104729, ge=0)

    @model_validator(mode="after")
    def _folder_matches_source(self) -> "CalibrationConfig":
        if self.source == "folder" and self.folder is None:
            raise ValueError("calibration source 'folder' needs calibration.folder (a CBIS-DDSM tree of public images)")
        if self.source == "synthetic" and self.folder is not None:
            raise ValueError("calibration.folder is only read with source 'folder'; remove it or set source to 'folder'")
        return self


class CompressionSettings(_Section):
    """What `compress_run` builds and measures.

    `sparsity` is the share of convolution and linear weights that global unstructured
    pruning zeroes; `channel_sparsity` the share of channels structured pruning removes
    from every prunable layer. `finetune_epochs` of distillation from the fp32 model on the
    calibration images repair both pruned models and drive quantisation-aware fine-tuning
    (0 skips the repair; int8_qat needs at least one). Latency is timed over
    `latency_runs` single-image calls, throughput over `throughput_runs` batches of
    `throughput_batch`, every backend limited to `threads` CPU threads.
    """

    enabled: bool = False
    variants: tuple[Literal[VARIANT_NAMES], ...] = DEFAULT_VARIANTS  # type: ignore[valid-type]
    sparsity: float = Field(default=0.5, gt=0.0, lt=1.0)
    channel_sparsity: float = Field(default=0.5, gt=0.0, lt=1.0)
    finetune_epochs: int = Field(default=3, ge=0, le=100)
    finetune_learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    calibration: CalibrationConfig = CalibrationConfig()
    latency_runs: int = Field(default=50, ge=3)
    throughput_batch: int = Field(default=16, ge=1)
    throughput_runs: int = Field(default=10, ge=1)
    threads: int = Field(default=1, ge=1, le=256)

    @field_validator("variants")
    @classmethod
    def _baseline_once_each(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if BASELINE_VARIANT not in value:
            raise ValueError(f"variants must include {BASELINE_VARIANT!r}, the baseline every change is measured against")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"each variant at most once; repeated: {', '.join(repeated)}")
        return value

    @model_validator(mode="after")
    def _qat_needs_epochs(self) -> "CompressionSettings":
        if "int8_qat" in self.variants and self.finetune_epochs == 0:
            raise ValueError("variant 'int8_qat' needs finetune_epochs >= 1 (quantisation-aware fine-tuning)")
        return self


def settings_with(base: CompressionSettings, **changes: Any) -> CompressionSettings:
    """`base` with `changes` applied and validated again (``model_copy`` would skip validation).

    Raises ConfigError naming each offending key under ``compression``.
    """
    try:
        return CompressionSettings.model_validate({**base.model_dump(), **changes})
    except ValidationError as error:
        problems = [
            f"  - {'.'.join(('compression', *map(str, item['loc'])))}: {item['msg'].removeprefix('Value error, ')}"
            for item in error.errors()
        ]
        raise ConfigError("invalid compression settings:\n" + "\n".join(problems)) from None
