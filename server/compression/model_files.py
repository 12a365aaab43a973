"""The model files a variant is served from: a PyTorch weights file or an ONNX graph.

Every served model has one contract, whatever its backend or number format: images
float32 [N, 1, S, S] in [0, 1] in, class probabilities float32 [N, 3] out
(`ProbabilityModel`). The cast to the compute precision and the softmax live inside the
model, so a caller never needs to know which variant it holds.

The PyTorch file holds plain tensors and numbers only and is read with
``torch.load(weights_only=True)``: no code from the file ever runs (a torch.export
``.pt2`` would be unpickled). It rebuilds the registry architecture from the checkpoint's
spec, then resizes the layers that channel pruning narrowed to the stored shapes.

Unstructured-pruned weights are stored as a bit mask plus the non-zero values: 1/8 byte
per weight plus the value per survivor, which beats dense storage at any sparsity above
~3 %, whereas torch's COO (8 bytes of index per dimension) and CSR (8 bytes per column
index) layouts would make a 50 %-sparse convolution larger than dense.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common.errors import ModelError
from common.models.classifier import (
    build_classifier,
    read_weights_file,
    write_weights_file,
)

PYTORCH_FORMAT = "mammofl-served-pytorch"
PYTORCH_FORMAT_VERSION = 1
ONNX_INPUT, ONNX_OUTPUT = "images", "probabilities"
ONNX_OPSET = 18
MAX_BATCH = 4096
PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Module attributes that fix a layer's tensor shapes; channel pruning rewrites them.
_SHAPE_ATTRIBUTES = (
    "in_channels", "out_channels", "groups", "num_features", "num_channels", "num_groups", "in_features", "out_features",
)


class ProbabilityModel(nn.Module):
    """Images float32 [N, 1, S, S] in [0, 1] -> probabilities float32 [N, classes].

    `classifier` may hold its weights in fp16 or bf16: the input is cast to
    `compute_dtype` and the logits back to float32 before the softmax.
    """

    def __init__(self, classifier: nn.Module, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.classifier = classifier
        self.compute_dtype = compute_dtype

    def forward(self, images: Tensor) -> Tensor:
        logits = self.classifier(images.to(self.compute_dtype))
        return torch.softmax(logits.float(), dim=1)


def write_pytorch_model(model: nn.Module, spec: dict[str, Any], precision: str, path: Path) -> None:
    """Save `model` (a classifier built from `spec`, possibly pruned) in `precision`."""
    dtype = _dtype(precision)
    state = {key: _cast(tensor, dtype) for key, tensor in model.state_dict().items()}
    sparse = {key: _pack_sparse(tensor) for key, tensor in state.items() if _packing_pays(tensor)}
    write_weights_file(
        {
            "format": PYTORCH_FORMAT,
            "version": PYTORCH_FORMAT_VERSION,
            "spec": dict(spec),
            "precision": precision,
            "architecture": _architecture(model),
            "state_dict": {key: tensor for key, tensor in state.items() if key not in sparse},
            "sparse": sparse,
        },
        path,
    )


def read_pytorch_model(path: Path) -> ProbabilityModel:
    """The model `write_pytorch_model` saved, in eval mode, behind the probability contract."""
    payload = read_weights_file(path)
    if not isinstance(payload, dict) or payload.get("format") != PYTORCH_FORMAT:
        raise ModelError(f"{path}: not a {PYTORCH_FORMAT} file (written by write_pytorch_model)")
    if payload.get("version") != PYTORCH_FORMAT_VERSION:
        raise ModelError(f"{path}: {PYTORCH_FORMAT} version {payload.get('version')!r}; valid: {PYTORCH_FORMAT_VERSION}")
    dtype = _dtype(payload["precision"])
    spec = payload["spec"]
    classifier = build_classifier(
        spec["encoder"], norm=spec["norm"], dropout=spec["dropout"], num_classes=spec["num_classes"]
    )
    state = {**payload["state_dict"], **{key: _unpack_sparse(entry) for key, entry in payload["sparse"].items()}}
    _fit_architecture(classifier, payload["architecture"], state)
    try:
        classifier.to(dtype).load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(f"{path}: stored weights do not fit the stored architecture: {error}") from error
    return ProbabilityModel(classifier.eval(), dtype).eval()


def export_onnx(model: ProbabilityModel, path: Path, image_size: int) -> None:
    """Write `model` as one self-contained ONNX file with a dynamic batch dimension.

    Uses the torch.export-based exporter (the TorchScript one is deprecated); weights are
    kept inside the file so the serving folder holds exactly one model file.
    """
    example = torch.rand(2, 1, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        dynamo=True,
        external_data=False,
        opset_version=ONNX_OPSET,
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes={"images": {0: batch}},
        verbose=False,
    )


def _dtype(precision: str) -> torch.dtype:
    if precision not in PRECISION_DTYPES:
        raise ModelError(f"PyTorch precision {precision!r} is not servable; valid: {', '.join(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[precision]


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """Floating tensors in `dtype`; integer buffers (BatchNorm's batch counter) unchanged."""
    tensor = tensor.detach().cpu()
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _architecture(model: nn.Module) -> dict[str, dict[str, int]]:
    """The shape-fixing integer attributes of every module that has some."""
    layout = {
        name: {attr: getattr(module, attr) for attr in _SHAPE_ATTRIBUTES if type(getattr(module, attr, None)) is int}
        for name, module in model.named_modules()
    }
    return {name: attributes for name, attributes in layout.items() if attributes}


def _fit_architecture(model: nn.Module, architecture: dict[str, dict[str, int]], state: dict[str, Tensor]) -> None:
    """Narrow `model`'s layers, in place, to the attributes and tensor shapes of a pruned one."""
    for name, attributes in architecture.items():
        module = model.get_submodule(name)
        for attr, value in attributes.items():
            setattr(module, attr, value)
    current = model.state_dict()
    for key, tensor in state.items():
        if key in current and current[key].shape != tensor.shape:
            owner_name, _, leaf = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            resized = torch.empty_like(tensor)
            setattr(owner, leaf, nn.Parameter(resized) if isinstance(getattr(owner, leaf), nn.Parameter) else resized)


def _packing_pays(tensor: Tensor) -> bool:
    """True when mask + values take fewer bytes than the dense floating tensor."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    nonzero = int(torch.count_nonzero(tensor))
    return tensor.numel() / 8 + nonzero * tensor.element_size() < tensor.numel() * tensor.element_size()


def _pack_sparse(tensor: Tensor) -> dict[str, Any]:
    mask = (tensor != 0).flatten()
    return {
        "shape": list(tensor.shape),
        "mask": torch.from_numpy(np.packbits(mask.numpy())),
        "values": tensor.flatten()[mask].clone(),
    }


def _unpack_sparse(entry: dict[str, Any]) -> Tensor:
    values: Tensor = entry["values"]
    numel = int(np.prod(entry["shape"]))
    mask = torch.from_numpy(np.unpackbits(entry["mask"].numpy(), count=numel).astype(bool))
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[mask] = values
    return dense.reshape(entry["shape"])
