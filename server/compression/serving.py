"""Serving artefacts: ``runs/<id>/serving/<variant>/`` holds one model file and ``metadata.json``.

The metadata says everything a server needs to use the model correctly without the run
(class names, preprocessing, input size, backend, the variant's test metrics, where it
came from) and the model file's sha256. `load_serving_model` refuses a file whose hash
does not match before reading a byte of it as a model, so a truncated copy or a file
swapped after the report was written is never served.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from common.errors import ModelError
from server.compression.model_files import ONNX_INPUT, read_pytorch_model

METADATA_FILE = "metadata.json"
METADATA_VERSION = 1
PYTORCH_MODEL_FILE, ONNX_MODEL_FILE = "model.pt", "model.onnx"
_CHUNK = 1 << 20


class Preprocessing(BaseModel):
    """How a mammogram becomes the model input (`common.data.images.preprocess` for "full",
    `common.data.dataset.roi_crop` for "roi"); intensity normalisation happens inside the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["full", "roi"]
    image_size: int
    channels: int = 1
    value_range: tuple[float, float] = (0.0, 1.0)
    dtype: str = "float32"


class SourceRun(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    run_id: str
    checkpoint: str
    checkpoint_sha256: str


class ServingMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int = METADATA_VERSION
    variant: str
    backend: Literal["pytorch", "onnxruntime"]
    precision: str
    pruning: str
    model_file: str
    sha256: str
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    metrics: dict[str, float | None]
    source_run: SourceRun


@dataclass(frozen=True)
class ServingModel:
    """A loaded variant: `predict` maps images [N, 1, S, S] in [0, 1] to probabilities [N, classes]."""

    metadata: ServingMetadata
    _run: Callable[[np.ndarray], np.ndarray]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        size = self.metadata.preprocessing.image_size
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != (1, size, size) or len(batch) == 0:
            raise ModelError(
                f"variant {self.metadata.variant!r} expects images of shape [N, 1, {size}, {size}] "
                f"with N >= 1, got {list(batch.shape)}"
            )
        if batch.min() < 0.0 or batch.max() > 1.0:
            raise ModelError(
                f"variant {self.metadata.variant!r} expects pixel values in [0, 1], got "
                f"[{batch.min():.3g}, {batch.max():.3g}]; preprocess with mode {self.metadata.preprocessing.mode!r}"
            )
        return self._run(batch)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_metadata(variant_dir: Path, metadata: ServingMetadata) -> Path:
    path = variant_dir / METADATA_FILE
    path.write_text(metadata.model_dump_json(indent=2) + "\n")
    return path


def read_metadata(variant_dir: Path) -> ServingMetadata:
    path = Path(variant_dir) / METADATA_FILE
    if not path.is_file():
        raise ModelError(f"{variant_dir}: no {METADATA_FILE}; expected a folder written by `mammofl compress`")
    try:
        metadata = ServingMetadata.model_validate_json(path.read_text())
    except ValidationError as error:
        raise ModelError(f"{path}: invalid serving metadata: {error}") from None
    if metadata.format_version != METADATA_VERSION:
        raise ModelError(f"{path}: metadata format_version {metadata.format_version}; valid: {METADATA_VERSION}")
    return metadata


def load_serving_model(variant_dir: Path, *, threads: int | None = None) -> ServingModel:
    """The served model of `variant_dir`, after checking its file against the metadata's sha256.

    `threads` caps an ONNX Runtime session's intra-op threads; PyTorch's thread count is
    process-wide (``torch.set_num_threads``) and stays the caller's business.
    """
    variant_dir = Path(variant_dir)
    metadata = read_metadata(variant_dir)
    model_path = variant_dir / metadata.model_file
    if Path(metadata.model_file).name != metadata.model_file or not model_path.is_file():
        raise ModelError(f"{variant_dir / METADATA_FILE}: model_file {metadata.model_file!r} is not a file in {variant_dir}")
    actual = sha256_of(model_path)
    if actual != metadata.sha256:
        raise ModelError(
            f"{model_path}: sha256 {actual} does not match {metadata.sha256} recorded in {METADATA_FILE}; "
            "the file was changed or truncated after it was written, so it is not served"
        )
    return ServingModel(metadata, open_model_file(model_path, metadata.backend, threads=threads))


def open_model_file(path: Path, backend: str, *, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A numpy -> numpy probability function over the model file, on `backend`."""
    if backend == "pytorch":
        return _pytorch_runner(path)
    if backend == "onnxruntime":
        return _onnxruntime_runner(path, threads)
    raise ModelError(f"{path}: unknown serving backend {backend!r}; valid: pytorch, onnxruntime")


def _pytorch_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    model = read_pytorch_model(path)

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch)).numpy()

    return run


def _onnxruntime_runner(path: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {ONNX_INPUT: batch})[0]

    return run
