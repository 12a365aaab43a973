"""Weights & Biases tracking of a run: offline unless told otherwise, absent when disabled.

The mode is ``WANDB_MODE`` when set, else ``tracking.wandb_mode``; the project is
``WANDB_PROJECT`` when set, else ``tracking.project``. Offline runs land in
``runs/<id>/wandb/`` and can be synced later with ``wandb sync``. Every run also writes
``metrics.jsonl``, which stays the source of every report, so nothing depends on W&B.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from common.config import ExperimentConfig
from common.runs import RunDirectory


class Tracker:
    def __init__(self, config: ExperimentConfig, run: RunDirectory) -> None:
        self.mode = os.environ.get("WANDB_MODE", config.tracking.wandb_mode)
        self._wandb_run = None
        if self.mode == "disabled":
            return
        import wandb

        self._wandb = wandb
        self._wandb_run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", config.tracking.project),
            name=run.run_id,
            dir=str(run.root),
            mode=self.mode,
            config=config.model_dump(mode="json"),
            settings=wandb.Settings(silent=True, console="off"),
        )

    @property
    def active(self) -> bool:
        return self._wandb_run is not None

    def log_round(self, server_round: int, metrics: dict[str, Any], ledger_rows: list[dict[str, Any]]) -> None:
        if not self.active:
            return
        payload = {key: value for key, value in metrics.items() if isinstance(value, (int, float)) and math.isfinite(value)}
        payload |= {f"epsilon/{row['site']}": row["epsilon"] for row in ledger_rows if "epsilon" in row}
        self._wandb_run.log(payload, step=server_round)

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.log_round(epoch, metrics, [])

    def finish(self, model_path: Path) -> None:
        if not self.active:
            return
        if model_path.exists():
            artifact = self._wandb.Artifact(f"model-{self._wandb_run.name}", type="model")
            artifact.add_file(str(model_path))
            self._wandb_run.log_artifact(artifact)
        self._wandb_run.finish()
        self._wandb_run = None
