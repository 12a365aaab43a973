"""Model compression at the server: quantised and pruned variants of a run, measured and served.

`compress_run` builds every configured variant of a run's best model, measures it on the
run's held-out test split, publishes it to ``runs/<id>/serving/<variant>/`` and writes
``runs/<id>/compression/report.{json,md}``; `load_serving_model` is how the API loads one.
"""

from common.config import VARIANT_NAMES, CalibrationConfig, CompressionConfig
from server.compression.compress import check_compression, compress_run
from server.compression.report import CompressionReport, VariantResult, read_report
from server.compression.serving import ServingMetadata, ServingModel, load_serving_model
from server.compression.settings import settings_with

__all__ = [
    "VARIANT_NAMES",
    "CalibrationConfig",
    "CompressionConfig",
    "CompressionReport",
    "ServingMetadata",
    "ServingModel",
    "VariantResult",
    "check_compression",
    "compress_run",
    "load_serving_model",
    "read_report",
    "settings_with",
]
