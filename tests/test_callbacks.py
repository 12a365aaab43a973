"""ModelCheckpoint and EarlyStopping follow the Keras semantics the reference config names."""

import math

from common.callbacks import EarlyStopping, ModelCheckpoint
from common.config import EarlyStoppingConfig, ModelCheckpointConfig


class RecordingSaver:
    def __init__(self):
        self.saved = []

    def __call__(self, path, include_optimizer):
        self.saved.append((path.name, include_optimizer))


def test_saves_best_only_when_the_monitored_loss_improves(tmp_path):
    checkpoint = ModelCheckpoint(ModelCheckpointConfig(monitor="val_loss"), tmp_path)
    saver = RecordingSaver()

    results = [checkpoint.update(step, {"val_loss": loss}, saver) for step, loss in enumerate([1.0, 0.8, 0.9, 0.7], 1)]

    assert results == [True, True, False, True]
    assert saver.saved == [("best.pt", True)] * 3
    assert checkpoint.best_step == 4 and checkpoint.best_value == 0.7


def test_mode_max_for_accuracy_and_nan_never_counts_as_better(tmp_path):
    checkpoint = ModelCheckpoint(ModelCheckpointConfig(monitor="val_accuracy"), tmp_path)
    saver = RecordingSaver()
    for step, value in enumerate([0.5, math.nan, 0.4, 0.6], 1):
        checkpoint.update(step, {"val_accuracy": value}, saver)
    assert checkpoint.best_step == 4 and len(saver.saved) == 2


def test_save_freq_weights_only_and_every_step_files(tmp_path):
    config = ModelCheckpointConfig(save_freq=2, save_best_only=False, save_weights_only=True)
    checkpoint = ModelCheckpoint(config, tmp_path)
    saver = RecordingSaver()
    for step in range(1, 5):
        checkpoint.update(step, {"val_loss": 1.0 / step}, saver)
    assert saver.saved == [("step-002.pt", False), ("best.pt", False), ("step-004.pt", False), ("best.pt", False)]


def test_early_stopping_waits_patience_steps_beyond_min_delta():
    stopper = EarlyStopping(EarlyStoppingConfig(monitor="val_loss", patience=2, min_delta=0.05))
    decisions = [stopper.should_stop({"val_loss": loss}) for loss in [1.0, 0.9, 0.88, 0.87, 0.5]]
    assert decisions == [False, False, False, True, False]
