"""The gate: a site trains only on images `mammofl anonymize` produced with the shared secret."""

import json
import shutil
from dataclasses import dataclass, field

import pytest

from anonymize.batch import run_anonymize
from anonymize.gate import NotDeidentifiedError
from anonymize.secret import create_secret
from clients.client_app import load_site
from common.config import parse_config
from common.data.synthetic_dicom import synthesize_dataset
from common.runs import AppSettings


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
