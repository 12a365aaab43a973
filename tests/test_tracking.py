"""W&B tracking writes an offline run inside the run directory, and stays away when disabled."""

from common.config import parse_config
from common.runs import RunDirectory
from simulations.tracking import Tracker


def test_offline_run_lands_in_the_run_directory_with_metrics_and_the_model(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = RunDirectory.create(tmp_path, "tracked")
    model = run.model_dir / "best.pt"
    model.write_bytes(b"weights")
    tracker = Tracker(parse_config({"tracking": {"wandb_mode": "offline", "project": "mammofl-test"}}), run)

    tracker.log_round(1, {"test_accuracy": 0.5, "test_macro_auc": float("nan")}, [{"site": "site-01", "epsilon": 1.5}])
    tracker.finish(model)

    (offline,) = (run.root / "wandb").glob("offline-run-*")
    (history,) = offline.glob("*.wandb")
    assert history.stat().st_size > 0
    assert not tracker.active


def test_disabled_tracking_imports_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = RunDirectory.create(tmp_path, "quiet")
    tracker = Tracker(parse_config({}), run)
    tracker.log_round(1, {"test_accuracy": 0.5}, [])
    tracker.finish(run.model_dir / "best.pt")
    assert not (run.root / "wandb").exists() and not tracker.active
