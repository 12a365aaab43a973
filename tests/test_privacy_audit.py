"""The empirical privacy audit: its statistics, and the audit of a real (tiny) federation.

The statistics are checked against what they claim: on an epsilon-DP mechanism whose
attacker is exactly as good as epsilon allows (randomized response), the 95% lower bound
exceeds epsilon in at most 5% of audits, and comes near it.
"""

import json
import math

import numpy as np
import pytest

from common.privacy_audit import audit_bound, epsilon_lower_bound, membership_inference, p_value, roc_auc
from simulations.audit import (
    inclusion_bits,
    make_canaries,
    run_audit,
    site_canaries,
    training_digest,
    write_site_canaries,
)
from tests.test_federated import federated_config


def test_all_guesses_right_gives_the_closed_form_bound():
    # delta 0, r right of r: the bound solves q^r = alpha with q = e^eps / (1 + e^eps).
    q = 0.05 ** (1 / 20)
    assert epsilon_lower_bound(100, 20, 20, delta=0.0, alpha=0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_chance_guesses_bound_nothing_and_delta_only_loosens():
    assert epsilon_lower_bound(100, 50, 25, delta=0.0, alpha=0.05) == 0.0
    tight = epsilon_lower_bound(100, 50, 45, delta=0.0, alpha=0.05)
    loose = epsilon_lower_bound(100, 50, 45, delta=1e-3, alpha=0.05)
    assert 0 < loose < tight
    assert p_value(100, 50, 45, 1.0, 0.0) < p_value(100, 50, 45, 2.0, 0.0)  # larger epsilon, larger tail


def test_the_bound_is_valid_and_near_tight_on_randomized_response():
    # Randomized response at epsilon 2 is exactly 2-DP; its best attacker is right with
    # probability e^2 / (1 + e^2) on every canary.
    epsilon, m, trials = 2.0, 400, 200
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(trials):
        included = rng.integers(0, 2, m).astype(bool)
        truthful = rng.random(m) < math.exp(epsilon) / (1 + math.exp(epsilon))
        observed = np.where(truthful, included, ~included)
        scores = observed + rng.random(m) * 1e-3  # ties broken at random
        bounds.append(audit_bound(scores, included, delta=0.0).epsilon_lower_bound)
    bounds = np.array(bounds)
    assert (bounds > epsilon).mean() <= 0.05
    assert bounds.mean() > 0.5 * epsilon  # the audit is not vacuous against a leaky mechanism


def test_membership_inference_separates_and_does_not_invent():
    perfect = membership_inference([5.0, 6.0, 7.0], [0.0, 1.0, 2.0])
    assert perfect.auc == 1.0 and perfect.tpr_at_1pct_fpr == 1.0
    rng = np.random.default_rng(1)
    same = membership_inference(rng.normal(size=2000), rng.normal(size=2000))
    assert abs(same.auc - 0.5) < 0.05 and same.tpr_at_1pct_fpr < 0.03
    assert roc_auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5  # ties count one half


def test_canaries_are_mislabelled_files_and_only_included_ones_reach_their_site(tmp_path):
    from common.data.images import read_image

    bits = inclusion_bits(12, seed=3)
    assert bits == inclusion_bits(12, seed=3) and 0 < sum(bits) < 12
    canaries = make_canaries(tmp_path / "c", 12, images_per_canary=2, inclusion=bits)
    assert all(len(canary.images) == 2 for canary in canaries)
    image = read_image(canaries[0].images[0])
    assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.05
    manifest = write_site_canaries(tmp_path / "site.json", "site-a", canaries)
    records = site_canaries(manifest, "site-a")
    assert len(records) == 2 * sum(bits)
    assert {record.patient_id for record in records} == {c.canary_id for c in canaries if c.included}
    assert site_canaries(manifest, "site-b") == [] and site_canaries(None, "site-a") == []


def test_the_training_digest_ignores_names_and_outputs_but_not_the_recipe(tmp_path):
    config = federated_config(tmp_path)
    renamed = config.model_copy(update={"name": "other", "verbose": 2})
    assert training_digest(renamed) == training_digest(config)
    assert training_digest(config.model_copy(update={"learning_rate": 0.1})) != training_digest(config)


def audit_config(root, *, private: bool):
    # The small CNN memorises mislabelled canaries without DP: what shows that the audit can fail.
    return federated_config(
        root, optimizer="adam", learning_rate=0.003, batch_size=16,
        data={"root": str(root.parent / "data"), "cache_dir": str(root.parent / "cache"),
              "synthetic": {"sites": 2, "per_site": 100, "size": 96, "seed": 11, "burned_in_text": 0.0}},
        federation={"rounds": 3, "local_epochs": 5, "min_train_sites": 1, "fraction_evaluate": 0.0},
        privacy={"enabled": True, "target_epsilon": 8.0, "max_grad_norm": 1.0} if private else {"enabled": False})


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    # Same canaries, same inclusion, same seed: only the DP switch (and its fresh noise) differs.
    return {private: run_audit(audit_config(root / f"dp-{private}", private=private), root / f"out-{private}",
                               canaries=200, inclusion_seed=5, log=lambda message: None)
            for private in (True, False)}


@pytest.mark.slow
def test_a_dp_run_audits_below_its_epsilon(audits):
    report = audits[True].report
    assert report["privacy_enabled"] and report["epsilon"] is not None and 7.0 < report["epsilon"] <= 8.0
    assert report["epsilon_lower_bound"] <= report["epsilon"] and report["passed"] is True
    assert report["epsilon_lower_bound"] == max(a["epsilon_lower_bound"] for a in report["attackers"].values())
    assert report["attackers"]["aggregator"]["sees"] == ["site update"]
    assert report["attackers"]["aggregator"]["rounds_seen"] == 3


@pytest.mark.slow
def test_without_dp_the_same_canaries_show_the_leak(audits):
    report = audits[False].report
    assert report["epsilon"] is None and report["passed"] is None
    # Measured: 2.13 (the model user, 59 of 60 guesses right); the DP run: 0.
    assert report["epsilon_lower_bound"] >= 1.0
    assert report["canaries"] == 200 and report["canaries_included"] == audits[True].report["canaries_included"]


@pytest.mark.slow
def test_the_audit_writes_its_report_and_the_run_it_audited(audits):
    out = audits[True].directory
    saved = json.loads((out / "audit.json").read_text())
    for key in ("epsilon_lower_bound", "epsilon", "delta", "canaries", "membership_inference", "attackers"):
        assert key in saved
    assert 0.0 <= saved["membership_inference"]["auc"] <= 1.0
    assert (out / "audit.png").stat().st_size > 0 and "PASSED" in (out / "audit.md").read_text()
    ledger = [json.loads(line) for line in (out / "run").glob("*/privacy/ledger.jsonl").__next__().read_text().splitlines()]
    site = saved["canary_site"]
    # The canaries are accounted like any image of the canary site: it trained on more images.
    steps = {row["site"]: row["sample_rate"] for row in ledger if row["round"] == 1}
    assert steps[site] < min(rate for name, rate in steps.items() if name != site)
    assert "without DP" in (audits[False].directory / "audit.md").read_text()


def test_the_audit_command_refuses_bad_requests_before_any_training(tmp_path, capsys):
    from mammofl.cli import main

    config = tmp_path / "config.json"
    config.write_text(audit_config(tmp_path / "c", private=True).model_dump_json())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")

    assert main(["privacy", "audit", str(config), "--out", str(tmp_path / "o"), "--canaries", "3"]) == 2
    assert "at least 10 canaries" in capsys.readouterr().err
    assert main(["privacy", "audit", str(config), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["privacy", "audit", str(config), "--out", str(tmp_path / "o"), "--canary-site", "nowhere"]) == 2
    assert "valid: site-01, site-02" in capsys.readouterr().err
    assert not (tmp_path / "o" / "run").exists()


@pytest.mark.slow
def test_a_patient_level_run_is_audited_with_canary_patients(tmp_path):
    config = federated_config(
        tmp_path, encoder="scattering", optimizer="sgd", learning_rate=0.1, batch_size=16,
        data={"synthetic": {"sites": 2, "per_site": 80, "size": 96, "seed": 11, "burned_in_text": 0.0}},
        model={"image_size": 64, "dropout": 0.0},
        federation={"rounds": 2, "local_epochs": 2, "min_train_sites": 1, "fraction_evaluate": 0.0},
        privacy={"enabled": True, "target_epsilon": 8.0, "max_grad_norm": 1.0, "unit": "patient"})

    report = run_audit(config, tmp_path / "audit", canaries=40, inclusion_seed=2, log=lambda message: None).report

    assert report["unit"] == "patient" and report["images_per_canary"] == 3
    assert report["passed"] is True and report["epsilon_lower_bound"] <= report["epsilon"] <= 8.0
    trained = json.loads((tmp_path / "audit" / "canaries" / "site.json").read_text())["records"]
    patients = {record["patient_id"] for record in trained}
    assert len(trained) == 3 * len(patients) == 3 * report["canaries_included"]  # whole patients, in or out
    ledger = next((tmp_path / "audit" / "run").glob("*/privacy/ledger.jsonl")).read_text()
    assert '"unit": "patient"' in ledger
