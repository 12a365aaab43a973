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


def test_a_resumed_run_forgets_the_rounds_after_its_last_checkpoint_and_a_line_cut_short(tmp_path):
    run = RunDirectory.create(tmp_path, "resumed")
    for round_number in (1, 2, 3):
        run.log_metrics({"round": round_number, "test_accuracy": 0.5})
    run.log_metrics({"compression": "fp16"})
    with run.metrics_path.open("a") as stream:
        stream.write('{"round": 4, "test_acc')  # the aggregator died while writing

    assert run.forget_rounds_after(2) == 2
    assert run.read_metrics() == [{"round": 1, "test_accuracy": 0.5}, {"round": 2, "test_accuracy": 0.5},
                                  {"compression": "fp16"}]
    assert run.forget_rounds_after(2) == 0
