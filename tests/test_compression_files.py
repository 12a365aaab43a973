"""Served model files round-trip exactly, pruned or not, and a serving folder guards its contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ModelError
from common.models.classifier import build_classifier
from server.compression.model_files import write_pytorch_model, read_pytorch_model
from server.compression.prune import prune_channels, prune_unstructured, weight_sparsity
from server.compression.serving import (
    Preprocessing,
    ServingMetadata,
    SourceRun,
    load_serving_model,
    sha256_of,
    write_metadata,
)

SIZE = 32


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def trained_like(norm: str = "batch"):
    """A fresh smallcnn with non-trivial BatchNorm statistics, as after training."""
    torch.manual_seed(0)
    model = build_classifier("smallcnn", norm=norm)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_a_channel_pruned_model_reloads_with_its_narrower_layers(tmp_path, images, norm):
    pruned = prune_channels(trained_like(norm), 0.5, images)
    write_pytorch_model(pruned, pruned.spec, "fp32", tmp_path / "model.pt")
    reloaded = read_pytorch_model(tmp_path / "model.pt")
    with torch.no_grad():
        expected = torch.softmax(pruned(images), dim=1)
        assert torch.allclose(reloaded(images), expected, atol=1e-6)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in pruned.parameters())


def test_unstructured_zeros_are_stored_as_a_bit_mask_and_come_back_exactly(tmp_path, images):
    model = trained_like()
    pruned = prune_unstructured(model, 0.7)
    write_pytorch_model(model, model.spec, "fp32", tmp_path / "dense.pt")
    write_pytorch_model(pruned, pruned.spec, "fp32", tmp_path / "sparse.pt")
    reloaded = read_pytorch_model(tmp_path / "sparse.pt")
    restored = reloaded.classifier.state_dict()
    assert all(torch.equal(tensor, restored[key]) for key, tensor in pruned.state_dict().items())
    assert weight_sparsity(reloaded.classifier) == pytest.approx(0.7, abs=1e-4)
    # (0.3 * 4 bytes + 1/8 byte) / 4 bytes = 0.33 of the dense file, plus a little structure.
    assert (tmp_path / "sparse.pt").stat().st_size < 0.36 * (tmp_path / "dense.pt").stat().st_size


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_files_compute_in_half_and_answer_in_float32(tmp_path, images, precision, dtype):
    model = trained_like()
    write_pytorch_model(model, model.spec, precision, tmp_path / "model.pt")
    reloaded = read_pytorch_model(tmp_path / "model.pt")
    assert {p.dtype for p in reloaded.parameters()} == {dtype}
    with torch.no_grad():
        probs = reloaded(images)
        expected = torch.softmax(model(images), dim=1)
    assert probs.dtype == torch.float32 and torch.allclose(probs, expected, atol=0.05)


def test_a_file_of_another_kind_is_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a mammofl-served-pytorch file"):
        read_pytorch_model(tmp_path / "other.pt")


@pytest.fixture
def serving_folder(tmp_path: Path) -> Path:
    model = trained_like()
    folder = tmp_path / "fp32"
    folder.mkdir()
    write_pytorch_model(model, model.spec, "fp32", folder / "model.pt")
    write_metadata(folder, ServingMetadata(
        variant="fp32", backend="pytorch", precision="fp32", pruning="none", model_file="model.pt",
        sha256=sha256_of(folder / "model.pt"), class_names=("normal", "benign", "malignant"),
        preprocessing=Preprocessing(mode="full", image_size=SIZE), metrics={"accuracy": 0.5},
        source_run=SourceRun(run_id="run", checkpoint="model/best.pt", checkpoint_sha256="0" * 64),
    ))
    return folder


def test_a_serving_folder_predicts_probabilities(serving_folder, images):
    probs = load_serving_model(serving_folder).predict(images.numpy())
    assert probs.shape == (4, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize(("batch", "says"), [
    (np.zeros((2, 1, SIZE + 1, SIZE + 1), np.float32), rf"\[N, 1, {SIZE}, {SIZE}\]"),
    (np.zeros((1, SIZE, SIZE), np.float32), rf"\[N, 1, {SIZE}, {SIZE}\]"),
    (np.full((1, 1, SIZE, SIZE), 255.0, np.float32), r"values in \[0, 1\]"),
])
def test_inputs_outside_the_contract_are_refused(serving_folder, batch, says):
    with pytest.raises(ModelError, match=says):
        load_serving_model(serving_folder).predict(batch)


def test_a_model_file_outside_its_folder_is_refused(serving_folder):
    metadata = (serving_folder / "metadata.json").read_text().replace('"model.pt"', '"../model.pt"')
    (serving_folder / "metadata.json").write_text(metadata)
    with pytest.raises(ModelError, match="is not a file in"):
        load_serving_model(serving_folder)
