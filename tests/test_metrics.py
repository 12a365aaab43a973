"""Metrics agree with hand-computed values and with their clinical definitions."""

import math

import numpy as np
import pytest

from common.metrics import classification_metrics, presence_auc, type_auc, unusable_because


def one_hot_probs(predicted, confidence=0.8):
    probs = np.full((len(predicted), 3), (1 - confidence) / 2)
    probs[np.arange(len(predicted)), predicted] = confidence
    return probs


def test_perfect_predictions_score_one_everywhere():
    labels = np.array([0, 0, 1, 1, 2, 2])
    metrics = classification_metrics(labels, one_hot_probs(labels))

    for name in ("accuracy", "balanced_accuracy", "macro_auc", "presence_auc", "type_auc"):
        assert metrics[name] == pytest.approx(1.0)
    assert metrics["sensitivity_malignant"] == 1.0 and metrics["specificity_normal"] == 1.0


def test_hand_computed_confusion():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 0, 1, 1, 2, 2, 0])
    metrics = classification_metrics(labels, one_hot_probs(predicted))

    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    assert metrics["sensitivity_normal"] == pytest.approx(3 / 4)
    assert metrics["specificity_normal"] == pytest.approx(3 / 4)  # one of four abnormal called normal
    assert metrics["sensitivity_malignant"] == pytest.approx(1 / 2)
    assert metrics["specificity_malignant"] == pytest.approx(5 / 6)


def test_presence_uses_one_minus_p_normal_and_type_only_abnormal_images():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([
        [0.9, 0.05, 0.05],
        [0.2, 0.7, 0.1],
        [0.3, 0.1, 0.6],
        [0.95, 0.04, 0.01],  # a missed malignancy: low presence, but its type read-out says benign-ish
    ])
    assert presence_auc(labels, probs) == pytest.approx(2 / 3)
    # type: malignant scores 0.6/0.7=0.857 and 0.01/0.05=0.2 against benign 0.1/0.8=0.125
    assert type_auc(labels, probs) == pytest.approx(1.0)


def test_auc_is_nan_not_invented_when_one_class_is_missing():
    labels = np.array([1, 1, 1])
    metrics = classification_metrics(labels, one_hot_probs(labels))
    assert math.isnan(metrics["macro_auc"]) and math.isnan(metrics["presence_auc"]) and math.isnan(metrics["type_auc"])


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="expected labels"):
        classification_metrics(np.array([0, 1]), np.ones((3, 3)) / 3)


def test_agrees_with_sklearn_on_random_predictions():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=200)
    probs = rng.dirichlet(np.ones(3), size=200)
    metrics = classification_metrics(labels, probs)

    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)))
    assert metrics["macro_auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def test_a_model_that_answers_one_class_for_every_image_is_named_unusable():
    labels = np.array([0, 0, 1, 1, 2, 2])
    one_class = classification_metrics(labels, one_hot_probs(np.zeros(6, dtype=int)))
    working = classification_metrics(labels, one_hot_probs(labels))

    assert one_class["predicted_classes"] == 1 and working["predicted_classes"] == 3
    assert "single class" in unusable_because(one_class)
    assert unusable_because(working) is None
    assert "no better than chance" in unusable_because({"predicted_classes": 3, "macro_auc": 0.48})
    assert unusable_because({"predicted_classes": 2, "macro_auc": math.nan}) is None


def test_mean_interval_is_the_student_t_interval_and_retention_is_the_share_of_the_lead_over_chance():
    from common.metrics import mean_interval, retention

    mean, low, high = mean_interval([0.80, 0.84, 0.82])

    # t(0.975, 2) = 4.303; sd = 0.02; half-width = 4.303 * 0.02 / sqrt(3) = 0.0497
    assert mean == pytest.approx(0.82)
    assert (low, high) == (pytest.approx(0.82 - 0.0497, abs=1e-4), pytest.approx(0.82 + 0.0497, abs=1e-4))
    assert mean_interval([0.7]) == (0.7, 0.7, 0.7)
    assert retention(0.85, 0.90) == pytest.approx(0.875)
    assert math.isnan(retention(0.85, 0.5))
