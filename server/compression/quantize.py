"""int8 quantisation with ONNX Runtime's quantiser, and quantisation-aware fine-tuning.

Why ONNX Runtime and not PyTorch: ``torch.ao.quantization`` (eager and FX modes) is
deprecated, and its successor, PT2E, now lives in torchao, which is not a dependency.
PT2E's int8 graphs are also only fast on CPU once lowered by torch.compile/Inductor,
which needs a C++ toolchain wherever the model is served. ONNX Runtime's static QDQ
quantisation runs on its own int8 CPU kernels (Conv/Q/DQ are fused into QLinearConv),
produces one portable ``.onnx`` file the API serves without a compiler, and ORT is
already the second serving backend we must measure. The price: int8 exists only on the
ONNX Runtime backend.

Static quantisation: per-channel symmetric int8 weights, asymmetric uint8 activations
whose ranges are the min/max observed on the server's calibration images. The final
softmax stays in float: uint8 probabilities would move in steps of 1/255, rows would not
sum to one and the ties would blur every AUC.
Dynamic quantisation: int8 weights for the linear layers (MatMul/Gemm) only, activations
quantised per call, as PyTorch's ``quantize_dynamic`` does.

Weights use 7 bits of the int8 range (``reduce_range``). On x86 CPUs without VNNI (AVX2,
plain AVX-512) ONNX Runtime's uint8 x int8 kernels add pairs of products in 16 bits,
which saturates with full-range weights: on our test model that flipped 16 % of the
predicted classes, while the same QDQ graph simulated in float agreed 100 %. The
artefact may be served on any x86 machine, so it is made safe for all of them.

Quantisation-aware fine-tuning here is weight-only: BatchNorm is first folded into the
convolutions (as ORT's pre-processing will do), then the weights are fine-tuned through
a per-channel int8 fake quantiser with a straight-through gradient, so they settle on
values that survive rounding; activation ranges are still calibrated afterwards. It is
off by default: post-training int8 already agreed with fp32 on 98.8-100 % of our test
images, and a fine-tune on a few dozen server images moved predictions more (80-92 %).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse
from torch.nn.utils import parametrize

from server.compression.finetune import Finetune
from server.compression.model_files import ONNX_INPUT
from server.compression.prune import weight_layers

CALIBRATION_BATCH = 16
# Weight levels either side of zero: ONNX Runtime's reduced-range symmetric int8 is [-64, 64].
WEIGHT_LEVELS = 64


class _CalibrationImages(CalibrationDataReader):
    """Feeds the calibration images to ORT's calibrator in batches."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = iter(np.array_split(images, max(1, len(images) // CALIBRATION_BATCH)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {ONNX_INPUT: np.ascontiguousarray(batch, dtype=np.float32)}


class _PerTensorFallbackNotice(logging.Filter):
    """Drops ORT's "Axis 1 is out-of-range for weight ... with rank 1" warning.

    With per_channel=True the QDQ quantiser asks every weight for its channel axis; a weight of
    rank 1 has none and is quantised per tensor instead, which is what it should be. ORT logs that on the root logger once per
    such weight, a screenful per compression run that says nothing is wrong.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


@contextmanager
def _quiet_per_tensor_fallbacks() -> Iterator[None]:
    notice = _PerTensorFallbackNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def quantize_static_int8(fp32_model: Path, out_path: Path, calibration: np.ndarray, work_dir: Path) -> None:
    """Write the int8 QDQ version of `fp32_model`, calibrated on `calibration` [K, 1, S, S]."""
    prepared = _prepared(fp32_model, work_dir)
    with _quiet_per_tensor_fallbacks():
        _quantize_static(prepared, out_path, calibration)


def _quantize_static(prepared: Path, out_path: Path, calibration: np.ndarray) -> None:
    quantize_static(
        str(prepared),
        str(out_path),
        _CalibrationImages(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=True,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=[node.name for node in onnx.load(prepared).graph.node if node.op_type == "Softmax"],
    )


def quantize_dynamic_int8(fp32_model: Path, out_path: Path, work_dir: Path) -> None:
    """Write `fp32_model` with int8 linear-layer weights and run-time activation quantisation."""
    quantize_dynamic(
        str(_prepared(fp32_model, work_dir)),
        str(out_path),
        op_types_to_quantize=["MatMul", "Gemm"],
        weight_type=QuantType.QInt8,
        reduce_range=True,
    )


def _prepared(fp32_model: Path, work_dir: Path) -> Path:
    """`fp32_model` after ORT's recommended pre-processing (shape inference, BatchNorm folding)."""
    prepared = work_dir / f"{fp32_model.stem}-prepared.onnx"
    try:
        quant_pre_process(str(fp32_model), str(prepared))
    except TypeError:
        # ORT's symbolic shape inference loses the shapes of reflection-padded convolutions
        # (the scattering encoder's) and fails on the Concat after them; ONNX's own shape
        # inference, which the pre-processing also runs, handles them.
        quant_pre_process(str(fp32_model), str(prepared), skip_symbolic_shape=True)
    return prepared


class _FakeQuantizedWeight(nn.Module):
    """A weight as it will be stored: rounded to per-output-channel symmetric (7-bit) int8."""

    def forward(self, weight: Tensor) -> Tensor:
        reduce = tuple(range(1, weight.ndim))
        scale = (weight.detach().abs().amax(dim=reduce) / WEIGHT_LEVELS).clamp_min(1e-12)
        zero_point = torch.zeros(weight.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -WEIGHT_LEVELS, WEIGHT_LEVELS)


def quantisation_aware_finetune(model: nn.Module, finetune: Finetune) -> nn.Module:
    """A BatchNorm-folded copy of `model` whose weights `finetune` trained through int8 rounding."""
    student = fuse(copy.deepcopy(model).eval())
    layers = weight_layers(student)
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", _FakeQuantizedWeight())
    finetune(student)
    for layer in layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return student.eval()
