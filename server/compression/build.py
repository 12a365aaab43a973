"""Turning the run's fp32 model into each variant's model file.

A recipe is applied in three steps: prune (or not), change the number format, write the
file for the backend. Steps that several variants share (the channel-pruned model, the
fp32 ONNX graph that int8 starts from) are made once per `VariantBuilder`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.config import CompressionConfig
from common.models.classifier import MammoClassifier
from server.compression.finetune import distil
from server.compression.model_files import (
    ProbabilityModel,
    export_onnx,
    write_pytorch_model,
)
from server.compression.prune import prune_channels, prune_unstructured
from server.compression.quantize import (
    quantisation_aware_finetune,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from server.compression.serving import ONNX_MODEL_FILE, PYTORCH_MODEL_FILE
from server.compression.variants import Pruning, Recipe


@dataclass(frozen=True)
class BuiltVariant:
    """A written model file and the fp32-or-lower module it was made from (for parameter counts)."""

    model_file: Path
    module: nn.Module


class VariantBuilder:
    """Builds variants of `model` (fp32, eval mode); `work_dir` holds intermediate files."""

    def __init__(
        self,
        model: MammoClassifier,
        calibration: np.ndarray,
        settings: CompressionConfig,
        image_size: int,
        work_dir: Path,
    ) -> None:
        self.model = model.eval()
        self.calibration = calibration
        self.settings = settings
        self.image_size = image_size
        self.work_dir = work_dir
        self._fp32_onnx: dict[str, Path] = {}

    def build(self, recipe: Recipe, out_dir: Path) -> BuiltVariant:
        """Write the model file of `recipe` into `out_dir`."""
        out_dir.mkdir(parents=True, exist_ok=True)
        if recipe.precision == "int8_qat":
            return self._quantisation_aware(out_dir / ONNX_MODEL_FILE)
        module = self._pruned(recipe.pruning)
        if recipe.backend == "pytorch":
            path = out_dir / PYTORCH_MODEL_FILE
            write_pytorch_model(module, self.model.spec, recipe.precision, path)
            return BuiltVariant(path, module)
        path = out_dir / ONNX_MODEL_FILE
        fp32_onnx = self._onnx(recipe.pruning, module)
        if recipe.precision == "fp32":
            shutil.copyfile(fp32_onnx, path)
        elif recipe.precision == "int8_dynamic":
            quantize_dynamic_int8(fp32_onnx, path, self.work_dir)
        else:
            quantize_static_int8(fp32_onnx, path, self.calibration, self.work_dir)
        return BuiltVariant(path, module)

    @cached_property
    def _channel_pruned(self) -> MammoClassifier:
        return prune_channels(
            self.model, self.settings.channel_sparsity, torch.from_numpy(self.calibration), self._repair
        )

    def _pruned(self, pruning: Pruning) -> MammoClassifier:
        if pruning == "unstructured":
            return prune_unstructured(self.model, self.settings.sparsity, self._repair)
        if pruning == "structured":
            return self._channel_pruned
        return self.model

    def _repair(self, student: nn.Module) -> None:
        """The optional fine-tune after pruning: distillation from the fp32 model."""
        if self.settings.finetune_epochs:
            self._distil(student)

    def _distil(self, student: nn.Module) -> None:
        distil(
            student,
            self.model,
            torch.from_numpy(self.calibration),
            epochs=self.settings.finetune_epochs,
            learning_rate=self.settings.finetune_learning_rate,
            seed=self.settings.calibration.seed,
        )

    def _onnx(self, pruning: Pruning, module: nn.Module) -> Path:
        """The fp32 ONNX graph of `module`, exported once per pruning kind."""
        if pruning not in self._fp32_onnx:
            path = self.work_dir / f"{pruning}-fp32.onnx"
            export_onnx(ProbabilityModel(module), path, self.image_size)
            self._fp32_onnx[pruning] = path
        return self._fp32_onnx[pruning]

    def _quantisation_aware(self, path: Path) -> BuiltVariant:
        tuned = quantisation_aware_finetune(self.model, self._distil)
        fp32_onnx = self.work_dir / "qat-fp32.onnx"
        export_onnx(ProbabilityModel(tuned), fp32_onnx, self.image_size)
        quantize_static_int8(fp32_onnx, path, self.calibration, self.work_dir)
        return BuiltVariant(path, tuned)
