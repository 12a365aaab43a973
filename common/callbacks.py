"""Keras-style callbacks with the semantics the reference config promises.

``ModelCheckpoint`` is used per epoch by centralised training and per round by the
federated server, so it knows nothing of either: it is told a step number, the metrics
of that step and how to save.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from common.config import EarlyStoppingConfig, ModelCheckpointConfig

SaveFn = Callable[[Path, bool], None]
"""Writes a checkpoint to the path; the flag says whether optimizer state is included."""


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in direction `mode`. NaN never improves."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class ModelCheckpoint:
    """Saves ``best.pt`` when the monitored value improves (checked every ``save_freq`` steps).

    With ``save_best_only`` false every checked step is also kept as ``step-NNN.pt``.
    With ``save_weights_only`` the files hold the model alone; otherwise the optimizer
    state too, so that a run can resume from them.
    """

    def __init__(self, config: ModelCheckpointConfig, directory: Path) -> None:
        self.config = config
        self.directory = directory
        self.best_value: float | None = None
        self.best_step: int | None = None

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def update(self, step: int, metrics: dict[str, float], save: SaveFn) -> bool:
        """Consider step `step` (1-based); returns whether ``best.pt`` was written."""
        if step % self.config.every_epochs:
            return False
        include_optimizer = not self.config.save_weights_only
        if not self.config.save_best_only:
            save(self.directory / f"step-{step:03d}.pt", include_optimizer)
        value = metrics.get(self.config.monitor, math.nan)
        if not improved(value, self.best_value, self.config.resolved_mode):
            return False
        self.best_value, self.best_step = value, step
        save(self.best_path, include_optimizer)
        return True


class EarlyStopping:
    """Stops when the monitored value has not improved for ``patience`` steps."""

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.config = config
        self.best_value: float | None = None
        self.steps_without_improvement = 0

    def should_stop(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.config.monitor, math.nan)
        if improved(value, self.best_value, self.config.resolved_mode, self.config.min_delta):
            self.best_value = value
            self.steps_without_improvement = 0
        else:
            self.steps_without_improvement += 1
        return self.steps_without_improvement >= self.config.patience
