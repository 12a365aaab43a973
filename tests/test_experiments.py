"""`mammofl experiments`: several configs run in turn, a failing one reported, compression compared."""

import json
from pathlib import Path

from mammofl.cli import main

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.json"


def experiment_config(root: Path, name: str, **changes) -> Path:
    raw = json.loads(SMOKE.read_text())
    raw.update(name=name, epochs=1, augmentation=False)
    raw["data"] = {**raw["data"], "root": str(root / "data"), "cache_dir": str(root / "cache")}
    raw["tracking"] = {"runs_dir": str(root / "runs"), "wandb_mode": "disabled"}
    raw.update(changes)
    path = root / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


def test_the_runner_compares_every_config_and_their_compressed_variants(tmp_path, capsys):
    compressed = experiment_config(tmp_path, "compressed", compression={
        "enabled": True, "variants": ["fp32", "int8_dynamic"], "finetune_epochs": 0, "latency_runs": 3,
        "throughput_runs": 1, "throughput_batch": 4, "calibration": {"images": 8}})
    broken = experiment_config(tmp_path, "broken", data={"source": "cbis-ddsm", "root": str(tmp_path / "no-cbis-here")})

    status = main(["experiments", str(compressed), str(broken), "--runs-dir", str(tmp_path / "comparisons")])

    out = capsys.readouterr().out
    assert status == 1  # one experiment failed; the other still ran
    assert "| compressed | centralised | none |" in out
    assert "| broken | centralised | none | off | failed:" in out
    assert "| compressed | int8_dynamic | onnxruntime |" in out
    [written] = (tmp_path / "comparisons").glob("comparison-*.json")
    rows = {row["name"]: row for row in json.loads(written.read_text())}
    assert [variant["variant"] for variant in rows["compressed"]["compression"]] == ["fp32", "int8_dynamic"]
    assert rows["broken"]["compression"] == [] and rows["broken"]["error"]
    assert "## Compression" in written.with_suffix(".md").read_text()
