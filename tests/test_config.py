"""The config schema accepts the reference format verbatim and rejects bad files clearly."""

import json
from pathlib import Path

import pytest

from common.config import ExperimentConfig, load_config, parse_config
from common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference-config.json"


def test_reference_config_is_accepted_exactly_as_written():
    config = load_config(REPO / "configs" / "reference.json")

    assert config.epochs == 20 and config.batch_size == 32 and config.learning_rate == 0.001
    assert config.num_workers == 4 and config.optimizer == "adam" and config.loss == "cross_entropy"
    assert config.metrics == ("accuracy",) and config.encoder == "resnet50"
    assert config.validation_split == 0.2 and config.shuffle is True and config.verbose == 1
    assert config.augmentation.enabled is True
    assert config.checkpoint.filepath == "model.h5" and config.checkpoint.monitor == "val_loss"
    assert config.checkpoint.save_best_only is True and config.checkpoint.save_weights_only is False
    assert config.checkpoint.resolved_mode == "min" and config.checkpoint.every_epochs == 1
    assert config.model_save_dir == "export_model"


def test_our_copy_of_the_reference_config_matches_the_shared_one():
    if not SHARED_REFERENCE.exists():  # CI and developer checkouts have shared/ beside them
        pytest.skip(f"{SHARED_REFERENCE} is not beside this checkout")
    assert json.loads(SHARED_REFERENCE.read_text()) == json.loads((REPO / "configs" / "reference.json").read_text())


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert isinstance(load_config(path), ExperimentConfig)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"optimizer": "rmsprop"}, ["key 'optimizer'", "'adam', 'adamw' or 'sgd'", '"rmsprop"']),
        ({"epochs": 0}, ["key 'epochs'", "greater than or equal to 1"]),
        ({"learning_rte": 0.1}, ["key 'learning_rte'", "unknown key", "learning_rate"]),
        ({"data": {"sourc": "x"}}, ["key 'data.sourc'", "allowed here: cache_dir, deidentification_secret, layout, mode"]),
        ({"encoder": "vgg16"}, ["key 'encoder'", "resnet50", "smallcnn"]),
        ({"callbacks": [{"class_name": "ModelCheckpoint", "config": {"monitor": "val_f1"}}]},
         ["callbacks.0.config.monitor", "unknown monitor 'val_f1'", "val_accuracy"]),
        ({"callbacks": [{"class_name": "ModelCheckpoint", "config": {"filepth": "m.pt"}}]},
         ["callbacks.0.config.filepth", "allowed here: filepath, mode, monitor"]),
        ({"callbacks": [{"class_name": "TensorBoard"}]}, ["callbacks.0", "'ModelCheckpoint', 'EarlyStopping'"]),
        ({"callbacks": [{"class_name": "EarlyStopping"}, {"class_name": "EarlyStopping"}]},
         ["at most one callback of each class", "EarlyStopping"]),
        ({"privacy": {"enabled": True}}, ["key 'privacy'", "exactly one of target_epsilon or noise_multiplier"]),
        ({"privacy": {"enabled": True, "noise_multiplier": 1.1}}, ["key 'privacy'", "needs a budget"]),
        ({"privacy": {"site_budgets": {"site-01": -1}}}, ["privacy.site_budgets.site-01", "greater than 0"]),
        ({"federation": {"strategy": "fedsgd"}}, ["federation.strategy", "'fedavg', 'fedprox' or 'fedadam'"]),
        ({"data": {"partition": {"scheme": "dirichlet"}}}, ["data.partition", "needs num_sites"]),
        ({"validation_split": 1.5}, ["key 'validation_split'", "less than 1"]),
        ({"augmentation": "yes"}, ["key 'augmentation'"]),
    ],
)
def test_invalid_values_name_the_file_the_key_and_what_is_allowed(raw, expected):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, source="configs/bad.json")

    message = str(caught.value)
    assert message.startswith("configs/bad.json: invalid configuration")
    for fragment in expected:
        assert fragment in message


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "epochs": 3,\n  "batch_size": \n}\n')

    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON at line 4"):
        load_config(path)


def test_missing_file_and_non_object_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        load_config(tmp_path / "list.json")


def test_augmentation_accepts_the_boolean_shorthand_and_the_object_form():
    assert parse_config({"augmentation": False}).augmentation.enabled is False
    assert parse_config({"augmentation": {"strength": 0.5}}).augmentation.strength == 0.5


def test_norm_auto_picks_group_norm_when_dp_is_on():
    assert parse_config({}).norm == "batch"
    assert parse_config({"privacy": {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 5}}).norm == "group"
    assert parse_config({"model": {"norm": "group"}}).norm == "group"


def test_checkpoint_mode_auto_follows_the_monitor():
    config = parse_config({"callbacks": [{"class_name": "ModelCheckpoint", "config": {"monitor": "val_macro_auc", "save_freq": 2}}]})
    assert config.checkpoint.resolved_mode == "max" and config.checkpoint.every_epochs == 2
