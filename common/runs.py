"""The on-disk layout of one run: ``runs/<run_id>/``.

    config.json      the resolved configuration (every default filled in)
    metrics.jsonl    one JSON object per epoch or round; the source of every report
    model/           best.pt, last.pt (and step-NNN.pt when configured)
    summary.md       the human-readable result
"""

from __future__ import annotations

import functools
import json
import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from common.config import ExperimentConfig, load_config, parse_config
from common.errors import ConfigError


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    """Append `record` to a JSON-lines file (NaN and infinities as null), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(json_safe(record), sort_keys=True) + "\n")


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file; [] when there is no file."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class RunDirectory:
    root: Path

    @classmethod
    def create(cls, runs_dir: Path, name: str) -> "RunDirectory":
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        root = Path(runs_dir) / f"{stamp}-{name}-{secrets.token_hex(2)}"
        (root / "model").mkdir(parents=True)
        return cls(root)

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.md"

    def write_config(self, config: BaseModel) -> None:
        (self.root / "config.json").write_text(config.model_dump_json(indent=2) + "\n")

    def log_metrics(self, record: dict[str, Any]) -> None:
        append_json_line(self.metrics_path, record)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_json_lines(self.metrics_path)

    def forget_rounds_after(self, last_round: int) -> int:
        """Drop the metrics of rounds after `last_round`, and a line cut short; returns how many went.

        A resumed run restarts after its last checkpoint: an aggregator killed between logging
        a round and saving that round's model left a row the rerun round will write again.
        """
        if not self.metrics_path.exists():
            return 0
        kept: list[str] = []
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row.get("round"), int) or row["round"] <= last_round:
                kept.append(line)
        if len(kept) < len(lines):
            partial = self.metrics_path.with_name(self.metrics_path.name + ".partial")
            partial.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            partial.replace(self.metrics_path)
        return len(lines) - len(kept)

    def write_json(self, relative: str, payload: Any) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(payload), indent=2, sort_keys=True) + "\n")
        return path


@dataclass(frozen=True)
class AppSettings:
    """Where a federated run's config and directory are, for the ServerApp and every ClientApp."""

    config_path: Path
    run_dir: Path
    canaries: Path | None = None  # a privacy audit's canaries for one site (`simulations.audit.site_canaries`)


UNIT_WEIGHT = "unit-weight"
"""A metric every site reply carries as 1: the weight of an unweighted mean (client-level DP
aggregates sites, not images)."""

CONFIG_JSON = "config-json"


def app_config(run_config: dict, explicit: AppSettings | None) -> ExperimentConfig:
    """The experiment config a Flower app runs with.

    The explicit file (``mammofl simulate``), else the config carried in the run config itself
    (``config-json``, set by ``mammofl federation run``: a site on another machine needs no
    copy of the aggregator's files), else the file at ``config-path`` (``flwr run``).
    """
    if explicit is not None:
        return load_config(explicit.config_path)
    if str(run_config.get(CONFIG_JSON, "")):  # "" (the app's default) means not given
        return _config_from_json(str(run_config[CONFIG_JSON]))
    if "config-path" not in run_config:
        raise ConfigError(f"the run config names no experiment config: give {CONFIG_JSON!r} or 'config-path'")
    return load_config(Path(str(run_config["config-path"])))


@functools.lru_cache(maxsize=8)
def _config_from_json(text: str) -> ExperimentConfig:
    """Parsed once per run config (a site worker serves many messages of one run; configs are frozen)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"run config {CONFIG_JSON!r}: not JSON ({exc.msg} at character {exc.pos})") from None
    return parse_config(raw, source=f"run config {CONFIG_JSON!r}")


def resolve_app_settings(run_config: dict, run_id: int, explicit: AppSettings | None, runs_dir: Path) -> AppSettings:
    """Explicit settings (``mammofl simulate``), else Flower's run config (``flwr run``).

    Under ``flwr run`` the run directory is ``run-dir`` when given (``mammofl federation run``
    names it, so that a resubmitted run resumes there), else derived from Flower's run id, so
    that the ServerApp and every ClientApp agree on it without talking to each other.
    """
    if explicit is not None:
        return explicit
    run_dir = str(run_config.get("run-dir", "")) or Path(runs_dir) / f"flwr-{run_id}"
    return AppSettings(config_path=Path(str(run_config.get("config-path", Path(run_dir) / "config.json"))),
                       run_dir=Path(run_dir))
