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
