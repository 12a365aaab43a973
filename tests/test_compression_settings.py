"""Bad compression requests fail with a clear message, before any model or data is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from common.config import parse_config
from common.data.synthetic_dicom import synthesize_dataset
from common.errors import ConfigError, ModelError
from common.models.classifier import build_classifier, save_checkpoint
from common.runs import RunDirectory
from server.compression import VARIANT_NAMES, CalibrationConfig, CompressionConfig, compress_run, settings_with
from server.compression.datasets import calibration_images
from server.compression.variants import RECIPES


def test_every_configurable_variant_has_a_recipe():
    assert set(VARIANT_NAMES) == set(RECIPES)


@pytest.mark.parametrize(("changes", "key", "says"), [
    ({"variants": ("fp32", "int4")}, "compression.variants.1", "'int8_static'"),
    ({"variants": ("fp16", "int8_static")}, "compression.variants", "must include 'fp32'"),
    ({"variants": ("fp32", "fp16", "fp16")}, "compression.variants", "repeated: fp16"),
    ({"sparsity": 1.0}, "compression.sparsity", "less than 1"),
    ({"sparsity": 0.0}, "compression.sparsity", "greater than 0"),
    ({"channel_sparsity": -0.2}, "compression.channel_sparsity", "greater than 0"),
    ({"calibration": {"source": "folder"}}, "compression.calibration", "needs calibration.folder"),
    ({"variants": ("fp32", "int8_qat"), "finetune_epochs": 0}, "compression", "needs finetune_epochs >= 1"),
])
def test_invalid_settings_name_the_key_and_what_is_valid(changes, key, says):
    with pytest.raises(ConfigError) as raised:
        settings_with(CompressionConfig(), **changes)
    message = str(raised.value)
    assert f"{key}:" in message and says in message


def test_direct_construction_validates_too():
    with pytest.raises(ValidationError, match="sparsity"):
        CompressionConfig(sparsity=1.5)


def test_defaults_measure_every_variant_but_quantisation_aware_training():
    assert set(CompressionConfig().variants) == set(VARIANT_NAMES) - {"int8_qat"}


@pytest.fixture
def untrained_run(tmp_path: Path) -> Path:
    """A run folder with a config and a checkpoint; its data does not exist (and is never needed)."""
    config = parse_config({
        "name": "preflight",
        "encoder": "smallcnn",
        "model": {"image_size": 32},
        "data": {"root": str(tmp_path / "sites"), "synthetic": {"seed": 7}},
        "tracking": {"runs_dir": str(tmp_path / "runs")},
    })
    run = RunDirectory.create(config.tracking.runs_dir, config.name)
    run.write_config(config)
    save_checkpoint(build_classifier("smallcnn"), run.model_dir / "best.pt")
    return run.root


@pytest.mark.parametrize(("calibration", "says"), [
    ({"source": "synthetic", "seed": 7}, "equals data.synthetic.seed"),
    ({"source": "folder", "folder": "{sites}"}, "never site data"),
    ({"source": "folder", "folder": "{sites}/site-01"}, "never site data"),
    ({"source": "folder", "folder": "{empty}"}, "not a readable CBIS-DDSM tree"),
])
def test_unusable_calibration_data_fails_before_any_work(untrained_run, tmp_path, calibration, says):
    (tmp_path / "empty").mkdir()
    if "folder" in calibration:
        calibration["folder"] = calibration["folder"].format(sites=tmp_path / "sites", empty=tmp_path / "empty")
    settings = CompressionConfig(calibration=calibration)
    with pytest.raises(ConfigError, match=says):
        compress_run(untrained_run, settings, log=lambda line: None)
    assert sorted(path.name for path in untrained_run.iterdir()) == ["config.json", "model"]


def test_a_run_without_a_trained_model_is_refused(untrained_run):
    (untrained_run / "model" / "best.pt").unlink()
    with pytest.raises(ModelError, match="best.pt"):
        compress_run(untrained_run, CompressionConfig(), log=lambda line: None)


def test_a_public_folder_calibrates_with_images_preprocessed_like_the_runs(tmp_path):
    synthesize_dataset(tmp_path / "public", sites=1, per_site=6, size=64, seed=3)
    config = parse_config({"model": {"image_size": 32}, "data": {"root": str(tmp_path / "sites"), "mode": "roi"}})
    images = calibration_images(config, CalibrationConfig(source="folder", folder=tmp_path / "public" / "site-01", images=4))
    assert images.shape == (4, 1, 32, 32) and images.dtype == "float32"
    assert 0.0 <= images.min() and images.max() <= 1.0
