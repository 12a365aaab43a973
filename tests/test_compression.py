"""Compression of a real (tiny) trained run: every variant built, published, reloaded and measured.

One run is trained once for the module (synthetic DICOMs with doubled lesion contrast,
smallcnn at 64 px, where six epochs clearly beat chance), then compressed once with every
variant; the tests read what that left on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_pruning as tp

from common.config import parse_config
from common.errors import ModelError
from common.metrics import classification_metrics
from server.compression import (
    VARIANT_NAMES,
    CompressionReport,
    CompressionConfig,
    compress_run,
    load_serving_model,
    read_report,
)
from server.compression.datasets import held_out_test_set
from server.compression.model_files import read_pytorch_model
from server.compression.prune import weight_layers, weight_sparsity
from server.compression.report import write_report
from server.compression.variants import RECIPES
from simulations.centralised import train_centralised

pytestmark = pytest.mark.slow

IMAGE_SIZE = 64
SPARSITY = 0.5
# Measured on this fixture (50 test images): int8_static agrees with fp32 on 98 % (one
# borderline image flips), int8_dynamic on 100 %, pruned_structured_int8 with
# pruned_structured on 100 %. Without reduce_range (see quantize.py) int8_static fell to 84 %.
MIN_INT8_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("compression")
    config = parse_config({
        "name": "compression-fixture",
        "seed": 0,
        "device": "cpu",
        "epochs": 6,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "loss": "weighted_cross_entropy",
        "num_workers": 0,
        "verbose": 0,
        "encoder": "smallcnn",
        "augmentation": False,
        "callbacks": [{"class_name": "ModelCheckpoint", "config": {"monitor": "val_macro_auc"}}],
        "model": {"image_size": IMAGE_SIZE},
        "data": {
            "source": "synthetic",
            "root": str(root / "data"),
            "cache_dir": str(root / "cache"),
            "synthetic": {
                "sites": 2, "per_site": 60, "size": 96, "seed": 0, "test_fraction": 0.4, "lesion_contrast": 2.0,
            },
        },
        "tracking": {"runs_dir": str(root / "runs"), "wandb_mode": "disabled"},
    })
    result = train_centralised(config)
    return result.run.root, config


@pytest.fixture(scope="module")
def compressed(trained_run) -> CompressionReport:
    run_dir, _ = trained_run
    settings = CompressionConfig(
        variants=VARIANT_NAMES,
        sparsity=SPARSITY,
        channel_sparsity=SPARSITY,
        finetune_epochs=1,
        calibration={"images": 16},
        latency_runs=3,
        throughput_batch=4,
        throughput_runs=1,
    )
    return compress_run(run_dir, settings, log=lambda line: None)


@pytest.fixture(scope="module")
def test_set(trained_run) -> tuple[np.ndarray, np.ndarray]:
    return held_out_test_set(trained_run[1])


def predictions(run_dir: Path, variant: str, images: np.ndarray) -> np.ndarray:
    return load_serving_model(run_dir / "serving" / variant).predict(images)


def test_fixture_model_is_better_than_chance(trained_run, compressed, test_set):
    run_dir, _ = trained_run
    images, labels = test_set
    probs = predictions(run_dir, "fp32", images)
    metrics = classification_metrics(labels, probs)
    # Measured: accuracy 0.80, macro AUC 0.92, all three classes predicted; chance is 1/3 and 0.5.
    assert metrics["macro_auc"] > 0.70
    assert metrics["accuracy"] > 0.55
    assert len(np.unique(probs.argmax(1))) >= 2, "a constant prediction would make agreement meaningless"


def test_fp32_variant_reproduces_the_runs_own_test_metrics(trained_run, compressed):
    run_dir, _ = trained_run
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    test_record = next(record for record in logged if record.get("split") == "test")
    fp32 = compressed.variant("fp32")
    assert compressed.test_images == 50
    for metric in ("accuracy", "macro_auc", "presence_auc", "type_auc"):
        assert fp32.metrics[metric] == pytest.approx(test_record[metric], abs=1e-6)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_every_variant_reloads_from_its_serving_folder_and_predicts(trained_run, compressed, test_set, variant):
    run_dir, _ = trained_run
    model = load_serving_model(run_dir / "serving" / variant)
    probs = model.predict(test_set[0][:5])
    recipe = RECIPES[variant]
    assert probs.shape == (5, 3) and probs.dtype == np.float32
    assert np.all(probs >= 0) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    assert (model.metadata.variant, model.metadata.backend, model.metadata.precision) == (
        variant, recipe.backend, recipe.precision
    )
    assert model.metadata.class_names == ("normal", "benign", "malignant")
    assert model.metadata.preprocessing.image_size == IMAGE_SIZE
    assert model.metadata.preprocessing.mode == "full"
    assert model.metadata.source_run.run_id == run_dir.name
    assert model.metadata.metrics["accuracy"] == compressed.variant(variant).metrics["accuracy"]


@pytest.mark.parametrize(("variant", "reference"), [
    ("int8_static", "fp32"),
    ("int8_dynamic", "fp32"),
    ("pruned_structured_int8", "pruned_structured"),
])
def test_int8_predictions_agree_with_their_float_model(trained_run, compressed, test_set, variant, reference):
    run_dir, _ = trained_run
    images = test_set[0]
    quantised = predictions(run_dir, variant, images).argmax(1)
    full_precision = predictions(run_dir, reference, images).argmax(1)
    assert (quantised == full_precision).mean() >= MIN_INT8_AGREEMENT


def test_files_shrink_as_the_number_format_and_pruning_predict(compressed):
    size = {result.variant: result.file_bytes for result in compressed.variants}
    # Half-width floats: half the bytes, plus a few kB of structure.
    assert size["fp16"] <= 0.52 * size["fp32"] and size["bf16"] <= 0.52 * size["fp32"]
    # int8 weights: a quarter of the float graph's bytes, plus per-channel scales.
    assert size["int8_static"] <= size["onnx_fp32"] / 3.4
    # 50 % zeros stored as a bit mask + values: (0.5 * 4 + 1/8) / 4 = 0.53 of dense.
    assert size["pruned_unstructured"] <= 0.56 * size["fp32"]
    # Half the channels of every layer: about a quarter of the weights.
    assert size["pruned_structured"] <= 0.30 * size["fp32"]
    assert size["pruned_structured_int8"] < size["pruned_structured_onnx"] / 2.5
    # Dynamic quantisation touches only the 3-logit linear head: no real saving.
    assert size["int8_dynamic"] <= size["onnx_fp32"]


def test_unstructured_pruning_reaches_the_stated_sparsity(trained_run, compressed):
    run_dir, _ = trained_run
    model = read_pytorch_model(run_dir / "serving" / "pruned_unstructured" / "model.pt")
    assert weight_sparsity(model.classifier) == pytest.approx(SPARSITY, abs=1e-4)
    result = compressed.variant("pruned_unstructured")
    weights = sum(layer.weight.numel() for layer in weight_layers(model.classifier))
    assert result.total_parameters - result.nonzero_parameters == pytest.approx(SPARSITY * weights, abs=2)


def test_structured_pruning_removes_channels_and_compute(trained_run, compressed):
    run_dir, _ = trained_run
    example = torch.rand(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    original = read_pytorch_model(run_dir / "serving" / "fp32" / "model.pt").classifier
    pruned = read_pytorch_model(run_dir / "serving" / "pruned_structured" / "model.pt").classifier
    original_macs, original_params = tp.utils.count_ops_and_params(original, example)
    pruned_macs, pruned_params = tp.utils.count_ops_and_params(pruned, example)
    assert pruned_macs <= original_macs / 3
    assert pruned_params <= original_params / 3
    assert pruned.head[-1].out_features == 3 and pruned.encoder.get_submodule("trunk.stem.0").in_channels == 1
    assert weight_sparsity(pruned) < 0.01, "channel pruning leaves a dense network"


def test_metadata_hash_matches_each_model_file(trained_run, compressed):
    run_dir, _ = trained_run
    for variant in VARIANT_NAMES:
        folder = run_dir / "serving" / variant
        metadata = json.loads((folder / "metadata.json").read_text())
        model_file = folder / metadata["model_file"]
        assert metadata["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
        assert sorted(path.name for path in folder.iterdir()) == sorted(
            ["metadata.json", metadata["model_file"], "model_card.json", "model_card.md"])
        card = json.loads((folder / "model_card.json").read_text())
        assert card["model"]["sha256"] == metadata["sha256"] and card["model"]["variant"] == variant


def test_a_changed_model_file_is_refused(trained_run, compressed, tmp_path):
    run_dir, _ = trained_run
    copy = shutil.copytree(run_dir / "serving" / "int8_static", tmp_path / "int8_static")
    with (copy / "model.onnx").open("ab") as stream:
        stream.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        load_serving_model(copy)


def test_report_is_written_as_json_markdown_and_plots(trained_run, compressed):
    run_dir, _ = trained_run
    out = run_dir / "compression"
    assert read_report(run_dir) == compressed
    assert [result.variant for result in compressed.variants] == list(VARIANT_NAMES)
    markdown = (out / "report.md").read_text()
    assert all(f"| {variant} |" in markdown for variant in VARIANT_NAMES)
    assert (out / "metric_changes.png").stat().st_size > 0 and (out / "latency_vs_size.png").stat().st_size > 0
    fp32 = compressed.variant("fp32").metrics
    for result in compressed.variants:
        assert result.latency_ms_p95 >= result.latency_ms_p50 > 0 and result.throughput_images_per_s > 0
        assert result.change["accuracy"] == pytest.approx(result.metrics["accuracy"] - fp32["accuracy"])


def test_the_report_says_plainly_when_a_variant_predicts_one_class(compressed, tmp_path):
    fp32 = compressed.variant("fp32")
    assert fp32.metrics["predicted_classes"] >= 2  # the fixture's model is a classifier: stored, and no FAILED line
    one_class = fp32.model_copy(update={"metrics": {**fp32.metrics, "predicted_classes": 1.0}})
    report = compressed.model_copy(update={"variants": (one_class, *compressed.variants[1:])})

    write_report(report, tmp_path)

    markdown = (tmp_path / "report.md").read_text()
    assert "**FAILED: `fp32` predicts a single class for every test image" in markdown
    assert "Agreement with it says nothing" in markdown
