"""Federated DP training end to end in Flower's simulation engine, on tiny synthetic images.

Two simulated federations: a healthy one (3 sites x 2 rounds with DP-SGD) and a troubled one
(a site whose budget is too small, a site whose images are broken, then a resume).
"""

import json
from pathlib import Path

import pytest

from clients.privacy import epsilon_of
from common.config import parse_config
from common.data.pipeline import load_records
from common.errors import ConfigError
from mammofl.cli import main
from server.privacy_ledger import PrivacyLedger
from simulations.federated import simulate

TARGET_EPSILON = 8.0


def federated_config(root: Path, **sections):
    raw = {
        "name": "fed", "seed": 11, "device": "cpu", "training": "federated", "epochs": 1,
        "batch_size": 16, "learning_rate": 0.003, "num_workers": 0, "encoder": "smallcnn", "verbose": 0,
        "augmentation": False, "validation_split": 0.2,
        "model": {"image_size": 64},
        "data": {"root": str(root / "data"), "cache_dir": str(root / "cache"),
                 "synthetic": {"sites": 3, "per_site": 60, "size": 96, "seed": 11, "burned_in_text": 0.0}},
        "federation": {"rounds": 2, "local_epochs": 2, "min_train_sites": 1},
        "privacy": {"enabled": True, "target_epsilon": TARGET_EPSILON, "max_grad_norm": 1.0},
        "tracking": {"runs_dir": str(root / "runs"), "wandb_mode": "disabled"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return parse_config(raw)


# The aggregator's last step: two variants, timed briefly (the test checks the wiring, not speed).
QUICK_COMPRESSION = {"enabled": True, "variants": ["fp32", "int8_static"], "finetune_epochs": 0,
                     "latency_runs": 3, "throughput_runs": 1, "throughput_batch": 4, "calibration": {"images": 8}}


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    config = federated_config(tmp_path_factory.mktemp("healthy"), compression=QUICK_COMPRESSION)
    return simulate(config, log=lambda message: None)


def rounds_of(run):
    return [row for row in run.read_metrics() if "round" in row]


def test_dp_federation_runs_every_round_with_every_site_and_checkpoints_the_global_model(healthy_run):
    # At this size (about 40 training images per site) DP-SGD at epsilon 8 does not learn beyond
    # chance in two rounds; the test checks the machinery (test_federated_utility.py: what does learn).
    rounds = rounds_of(healthy_run.run)
    assert [row["round"] for row in rounds] == [1, 2]
    assert all(row["sites_trained"] == 3 and row["sites_failed"] == 0 for row in rounds)
    assert all(0.0 <= row["test_accuracy"] <= 1.0 and row["val_loss"] > 0 for row in rounds)
    from common.models.classifier import load_checkpoint

    last, extra = load_checkpoint(healthy_run.run.model_dir / "last.pt")
    assert extra["round"] == 2 and (healthy_run.run.model_dir / "best.pt").is_file()
    assert any("group" in type(module).__name__.lower() for module in last.modules())  # DP-ready norm


def test_every_site_stays_within_its_target_and_the_ledger_matches_an_independent_accountant(healthy_run):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant
    from opacus.accountants import RDPAccountant

    rows = PrivacyLedger(healthy_run.run.root / "privacy").rows()
    for site in ("site-01", "site-02", "site-03"):
        site_rows = [row for row in rows if row["site"] == site]
        assert [row["round"] for row in site_rows] == [1, 2]
        reference = RdpAccountant(RDPAccountant.DEFAULT_ALPHAS)
        for row in site_rows:
            reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
                row["sample_rate"], dp_accounting.GaussianDpEvent(row["noise_multiplier"])), row["steps"]))
            assert row["epsilon"] == pytest.approx(reference.get_epsilon(row["delta"]), rel=0.01)
        assert 0 < site_rows[-1]["epsilon"] <= TARGET_EPSILON
        state = json.loads((healthy_run.run.root / "sites" / site / "privacy_state.json").read_text())
        assert epsilon_of(state["history"], accountant="rdp", delta=state["delta"]) == pytest.approx(site_rows[-1]["epsilon"])


def test_the_aggregator_compresses_the_best_global_model_after_the_last_round(healthy_run):
    from server.compression import load_serving_model, read_report

    report = read_report(healthy_run.run.root)
    assert report is not None and [result.variant for result in report.variants] == ["fp32", "int8_static"]
    int8 = report.variant("int8_static")
    assert int8.size_ratio > 2.0 and 0.0 <= int8.agreement_with_fp32 <= 1.0
    served = load_serving_model(healthy_run.run.root / "serving" / "int8_static")
    assert served.metadata.source_run.run_id == healthy_run.run.run_id


def test_every_served_variant_carries_a_model_card_that_round_trips_through_the_service(healthy_run, tmp_path):
    from server.model_card import read_card
    from tests.test_api_support import running_app, settings_for

    serving = healthy_run.run.root / "serving"
    card = read_card(serving / "int8_static")
    assert card["privacy_checks"]["passed"] is True and card["privacy"]["unit"] == "image"
    sites = card["privacy"]["sites"]
    assert len(sites) == 3 and all(site["images"] > 0 and 0 < site["epsilon"] <= TARGET_EPSILON for site in sites)
    assert [site["images"] for site in card["training"]["sites"]] == [site["images"] for site in sites]
    low, high = card["utility"]["intervals_95"]["accuracy"]
    assert low <= card["utility"]["metrics"]["accuracy"] <= high and low < high
    assert card["compression"]["agreement_with_fp32"] is not None and card["model"]["precision"] == "int8_static"
    assert len(card["data"]["files_sha256"]) == 64 and card["code"]["mammofl"]
    assert "no empirical privacy audit" in " ".join(card["privacy_checks"]["warnings"])
    assert "# Model card: int8_static" in (serving / "int8_static" / "model_card.md").read_text()

    with running_app(settings_for(tmp_path, model_dir=serving)) as app:
        listed = {model["variant"]: model for model in
                  app.client.get("/v1/models", headers=app.auth(role="reader")).json()["models"]}
        whole = app.client.get("/v1/models/int8_static/card", headers=app.auth(role="reader")).json()
    assert listed["int8_static"]["card"]["max_site_epsilon"] == max(site["epsilon"] for site in sites)
    assert whole == card


def test_an_attached_audit_reaches_the_card_and_a_failed_one_stops_serving(healthy_run, tmp_path, capsys):
    import shutil

    from api.inference import load_registry
    from common.config import load_config
    from server.model_card import read_card
    from simulations.audit import training_digest

    run = tmp_path / "run"
    shutil.copytree(healthy_run.run.root, run)
    digest = training_digest(load_config(run / "config.json"))

    def audit(name: str, **fields) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "audit.json").write_text(json.dumps({
            "config_digest": digest, "epsilon": 7.9, "unit": "image", "canaries": 50,
            "membership_inference": {"auc": 0.51, "tpr_at_1pct_fpr": 0.01},
            "attackers": {"model_user": {"epsilon_lower_bound": 0.3}, "aggregator": {"epsilon_lower_bound": 0.4}},
            **fields}))
        return folder

    assert main(["model-card", str(run), "--audit", str(audit("ok", epsilon_lower_bound=0.4, passed=True))]) == 0
    card = read_card(run / "serving" / "fp32")
    assert card["audit"]["epsilon_lower_bound"] == 0.4 and card["audit"]["same_config"] is True
    assert card["privacy_checks"]["passed"] and card["utility"]["intervals_95"]  # intervals kept on rewrite

    other = audit("other", epsilon_lower_bound=0.1, passed=True, config_digest="0" * 64)
    assert main(["model-card", str(run), "--audit", str(other)]) == 0
    assert "differs from this model's training config" in capsys.readouterr().out

    assert main(["model-card", str(run), "--audit", str(audit("broken", epsilon_lower_bound=9.5, passed=False))]) == 0
    assert read_card(run / "serving" / "fp32")["privacy_checks"]["passed"] is False
    with pytest.raises(ConfigError, match="privacy checks failed"):
        load_registry(run / "serving")


def test_a_compression_request_that_cannot_work_fails_before_the_first_round(tmp_path):
    missing = {**QUICK_COMPRESSION, "calibration": {"source": "folder", "folder": str(tmp_path / "no-such-folder")}}
    config = federated_config(tmp_path, compression=missing)

    with pytest.raises(ConfigError, match="calibration"):
        simulate(config, log=lambda message: None)

    assert not (tmp_path / "runs").exists()


def test_privacy_report_is_written_and_regenerated_from_the_ledger(healthy_run, capsys):
    privacy_dir = healthy_run.run.root / "privacy"
    written = json.loads((privacy_dir / "report.json").read_text())
    assert written["all_within_budget"] and len(written["sites"]) == 3
    assert "sample-level" in (privacy_dir / "report.md").read_text()
    assert (privacy_dir / "epsilon.png").stat().st_size > 1000
    (privacy_dir / "report.json").unlink()

    assert main(["privacy-report", str(healthy_run.run.root)]) == 0

    assert json.loads((privacy_dir / "report.json").read_text()) == written
    assert "site-01: epsilon" in capsys.readouterr().out


def test_refusing_and_failing_sites_do_not_sink_the_run_and_a_resumed_run_keeps_the_budget(tmp_path):
    # A fixed noise level with room for many rounds, except at site-03 whose budget allows none.
    config = federated_config(tmp_path, federation={"rounds": 1}, privacy={
        "target_epsilon": None, "noise_multiplier": 1.0, "budget_epsilon": 50.0, "site_budgets": {"site-03": 0.05}})
    broken = [r.image_path for r in load_records(config.data) if r.site_id == "site-02" and r.split == "train"]
    for path in broken:
        path.write_bytes(path.read_bytes()[:200])  # truncated DICOM: this site's data loading fails

    first = simulate(config, log=lambda message: None)
    run_config = json.loads((first.run.root / "config.json").read_text())
    run_config["federation"]["rounds"] = 2
    (first.run.root / "config.json").write_text(json.dumps(run_config))
    assert main(["simulate", "--resume", str(first.run.root)]) == 0

    rounds = rounds_of(first.run)
    assert [row["round"] for row in rounds] == [1, 2]
    assert all((row["sites_trained"], row["sites_refused"], row["sites_failed"]) == (1, 1, 1) for row in rounds)
    ledger = PrivacyLedger(first.run.root / "privacy").rows()
    by_site = {site: [row["status"] for row in ledger if row["site"] == site] for site in ("site-01", "site-03")}
    assert by_site == {"site-01": ["trained", "trained"], "site-03": ["refused", "refused"]}
    assert all("budget 0.05" in row["reason"] for row in ledger if row["status"] == "refused")
    failed = [row for row in ledger if row["status"] == "failed"]
    assert len(failed) == 2 and all(row["round"] in (1, 2) for row in failed)
