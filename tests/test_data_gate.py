"""The gate: a site trains only on images `mammofl anonymize` produced with the shared secret."""

import json
import shutil
from dataclasses import dataclass, field

import pytest

from anonymize.batch import run_anonymize
from anonymize.gate import NotDeidentifiedError
from anonymize.secret import create_secret
from clients.site_round import load_site
from common.config import parse_config
from common.errors import ConfigError
from common.data.synthetic_dicom import synthesize_dataset
from common.runs import AppSettings, app_config


@dataclass
class FakeContext:
    """What load_site reads of Flower's Context (a pure-logic test of the gate)."""

    node_config: dict
    run_config: dict = field(default_factory=dict)
    run_id: int = 1


@pytest.fixture(scope="module")
def raw_and_deidentified(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    synthesize_dataset(root / "raw", sites=2, per_site=8, size=64, seed=5, burned_in_text=0.0)
    secret = create_secret(root / "secret.key")
    run_anonymize(root / "raw", root / "deid", secret_file=secret, workers=1)
    for csv in (root / "raw").glob("site-*/csv"):
        shutil.copytree(csv, root / "deid" / csv.parent.name / "csv")
    return root, secret


def settings_for(root, data_root, secret, tmp_path):
    config = parse_config({"data": {"source": "sites", "root": str(data_root), "cache_dir": None,
                                    "require_deidentified": True, "deidentification_secret": str(secret)},
                           "tracking": {"runs_dir": str(tmp_path), "wandb_mode": "disabled"}})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    return AppSettings(config_path=path, run_dir=tmp_path / "run")


def test_a_site_of_anonymized_images_passes_the_gate(raw_and_deidentified, tmp_path):
    root, secret = raw_and_deidentified
    site = load_site(FakeContext({"partition-id": 0}), settings_for(root, root / "deid", secret, tmp_path))
    assert site.site_id == "site-01" and len(site.train) + len(site.val) > 0


def test_raw_hospital_exports_are_refused_before_any_training(raw_and_deidentified, tmp_path):
    root, secret = raw_and_deidentified
    with pytest.raises(NotDeidentifiedError, match="not produced by mammofl anonymize"):
        load_site(FakeContext({"partition-id": 0}), settings_for(root, root / "raw", secret, tmp_path))


def test_a_deployed_site_needs_only_the_run_config_its_data_and_its_own_secret(raw_and_deidentified, tmp_path):
    """A site on another machine: the config comes inside the run config (the aggregator's
    file is not there), the gate uses the secret the site was started with, and the image
    cache goes to the site's state folder, not the aggregator's path."""
    root, secret = raw_and_deidentified
    config = parse_config({"data": {"source": "sites", "root": "/nonexistent/aggregator/data",
                                    "cache_dir": "/nonexistent/aggregator/cache", "require_deidentified": True,
                                    "deidentification_secret": "/nonexistent/aggregator/anonymize.key"},
                           "tracking": {"runs_dir": str(tmp_path), "wandb_mode": "disabled"}})
    run_config = {"config-json": config.model_dump_json(), "config-path": "/nonexistent/runs/x/config.json",
                  "run-dir": "/nonexistent/runs/x"}
    node = {"site-id": "hospital-a", "data-dir": str(root / "deid" / "site-02"), "state-dir": str(tmp_path / "state"),
            "deidentification-secret": str(secret)}

    site = load_site(FakeContext(node, run_config), None)

    assert site.site_id == "hospital-a" and len(site.train) > 0
    assert site.config.data.cache_dir == tmp_path / "state" / "image-cache"
    with pytest.raises(NotDeidentifiedError):
        load_site(FakeContext({**node, "data-dir": str(root / "raw" / "site-02")}, run_config), None)
    with pytest.raises(ConfigError, match="anonymize.key does not exist"):
        load_site(FakeContext({key: value for key, value in node.items() if key != "deidentification-secret"},
                              run_config), None)


def test_a_run_config_without_a_usable_experiment_config_is_a_config_error():
    with pytest.raises(ConfigError, match="not JSON"):
        app_config({"config-json": "{not json"}, None)
    with pytest.raises(ConfigError, match="epochs"):
        app_config({"config-json": json.dumps({"epochs": 0})}, None)
    with pytest.raises(ConfigError, match="'config-json' or 'config-path'"):
        app_config({"config-json": "", "run-dir": "/x"}, None)
    with pytest.raises(ConfigError, match="/nonexistent/config.json: config file not found"):
        app_config({"config-json": "", "config-path": "/nonexistent/config.json"}, None)
