"""Each named variant as a recipe: which pruning, which number format, which serving backend.

The names are `settings.VARIANT_NAMES`; a variant is the product of three independent
choices, so combinations (``pruned_structured_int8``) need no code of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pruning = Literal["none", "unstructured", "structured"]
Precision = Literal["fp32", "fp16", "bf16", "int8_dynamic", "int8_static", "int8_qat"]
Backend = Literal["pytorch", "onnxruntime"]


@dataclass(frozen=True)
class Recipe:
    pruning: Pruning
    precision: Precision
    backend: Backend
    description: str


RECIPES: dict[str, Recipe] = {
    "fp32": Recipe("none", "fp32", "pytorch", "the run's best model, eager PyTorch (baseline)"),
    "fp16": Recipe("none", "fp16", "pytorch", "weights and activations in float16, eager PyTorch"),
    "bf16": Recipe("none", "bf16", "pytorch", "weights and activations in bfloat16, eager PyTorch"),
    "onnx_fp32": Recipe("none", "fp32", "onnxruntime", "the baseline exported to ONNX"),
    "int8_dynamic": Recipe("none", "int8_dynamic", "onnxruntime", "linear layers int8, activations quantised at run time"),
    "int8_static": Recipe("none", "int8_static", "onnxruntime", "int8 QDQ, activation ranges calibrated on server images"),
    "int8_qat": Recipe("none", "int8_qat", "onnxruntime", "int8 QDQ after quantisation-aware fine-tuning"),
    "pruned_unstructured": Recipe("unstructured", "fp32", "pytorch", "global magnitude pruning, stored sparse"),
    "pruned_structured": Recipe("structured", "fp32", "pytorch", "channels removed (torch-pruning), eager PyTorch"),
    "pruned_structured_onnx": Recipe("structured", "fp32", "onnxruntime", "channel-pruned model exported to ONNX"),
    "pruned_structured_int8": Recipe("structured", "int8_static", "onnxruntime", "channel-pruned, then int8 QDQ"),
}
