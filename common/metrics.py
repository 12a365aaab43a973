"""Classification metrics for the 3-class task and its two clinical read-outs.

"presence" asks whether an image shows any lesion (normal vs benign or malignant);
"type" asks, among images that truly show a lesion, whether it is malignant. Both are
scored from the 3-class probabilities (see common.models.classifier.readouts), so one
model answers all three questions.

An AUC is undefined when the scored set holds a single class; it is then reported as
NaN (``null`` in JSON), never as a made-up 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import confusion_matrix, roc_auc_score

from common.data.records import BENIGN, CLASS_NAMES, MALIGNANT, NORMAL


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """All scalar metrics for integer `labels` [N] and class probabilities `probs` [N, 3]."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.shape[0] != probs.shape[0] or probs.ndim != 2 or probs.shape[1] != len(CLASS_NAMES):
        raise ValueError(f"expected labels [N] and probs [N, {len(CLASS_NAMES)}], got {labels.shape} and {probs.shape}")
    if labels.size == 0:
        raise ValueError("cannot compute metrics on an empty set")
    predicted = probs.argmax(axis=1)
    rates = per_class_rates(labels, predicted)
    sensitivities = [rates[f"sensitivity_{name}"] for name in CLASS_NAMES]
    return {
        "accuracy": float((predicted == labels).mean()),
        # mean recall over the classes present, as sklearn's balanced_accuracy_score defines it
        "balanced_accuracy": float(np.nanmean(sensitivities)),
        "macro_auc": macro_auc(labels, probs),
        "presence_auc": presence_auc(labels, probs),
        "type_auc": type_auc(labels, probs),
        # 1 means the model answers the same class for every image: no classifier at all.
        "predicted_classes": float(len(np.unique(predicted))),
        **rates,
    }


def unusable_because(metrics: Mapping[str, float | None], *, prefix: str = "") -> str | None:
    """Why a model with these test metrics is no usable classifier, or None if nothing says so.

    `prefix` is the metrics' split prefix where they carry one ("test_" in a round's row).

    Two plain failures every report names: one class predicted for every image (accuracy then
    equals that class's share, and agreement between compressed variants means nothing), and
    a macro AUC at or below chance.
    """
    if metrics.get(f"{prefix}predicted_classes") == 1:
        return "predicts a single class for every test image: it is not a usable classifier"
    auc = metrics.get(f"{prefix}macro_auc")
    if auc is not None and not math.isnan(auc) and auc <= 0.5:
        return f"is no better than chance (test macro AUC {auc:.3f} <= 0.5)"
    return None


def per_class_rates(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """One-vs-rest sensitivity and specificity of each class."""
    matrix = confusion_matrix(labels, predicted, labels=list(range(len(CLASS_NAMES))))
    total = matrix.sum()
    rates: dict[str, float] = {}
    for index, name in enumerate(CLASS_NAMES):
        true_pos = matrix[index, index]
        false_neg = matrix[index].sum() - true_pos
        false_pos = matrix[:, index].sum() - true_pos
        true_neg = total - true_pos - false_neg - false_pos
        rates[f"sensitivity_{name}"] = _ratio(true_pos, true_pos + false_neg)
        rates[f"specificity_{name}"] = _ratio(true_neg, true_neg + false_pos)
    return rates


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Unweighted mean of one-vs-rest AUCs over the classes present in `labels`."""
    present = [index for index in range(len(CLASS_NAMES)) if (labels == index).any()]
    if len(present) < 2:
        return math.nan
    aucs = [roc_auc_score(labels == index, probs[:, index]) for index in present]
    return float(np.mean(aucs))


def presence_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """AUC of P(abnormal) = 1 - P(normal) for abnormal vs normal images."""
    return _binary_auc(labels != NORMAL, 1.0 - probs[:, NORMAL])


def type_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """AUC of P(malignant | abnormal), scored on the truly abnormal images only."""
    abnormal = labels != NORMAL
    lesion_mass = probs[abnormal, BENIGN] + probs[abnormal, MALIGNANT]
    score = probs[abnormal, MALIGNANT] / np.maximum(lesion_mass, 1e-12)
    return _binary_auc(labels[abnormal] == MALIGNANT, score)


def _binary_auc(truth: np.ndarray, score: np.ndarray) -> float:
    if truth.size == 0 or truth.all() or not truth.any():
        return math.nan
    return float(roc_auc_score(truth, score))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else math.nan


def mean_interval(values: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of repeated measurements and its Student-t confidence interval.

    One value has no interval (low = high = the value); NaNs are not dropped (a failed
    repetition makes the whole interval NaN rather than a flattering one).
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = float(data.mean())
    if data.size == 1:
        return mean, mean, mean
    half = float(stats.t.ppf((1 + confidence) / 2, df=data.size - 1) * data.std(ddof=1) / math.sqrt(data.size))
    return mean, mean - half, mean + half


def retention(auc: float, baseline_auc: float) -> float:
    """How much of the baseline's lead over chance a model keeps: (AUC - 0.5) / (AUC_baseline - 0.5)."""
    if baseline_auc <= 0.5:
        return math.nan
    return (auc - 0.5) / (baseline_auc - 0.5)


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, *, metrics: Sequence[str] = (
        "accuracy", "balanced_accuracy", "macro_auc"), resamples: int = 500, confidence: float = 0.95,
        seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap intervals of test metrics: images resampled with replacement.

    The interval is over the test set's sampling, for one trained model (a model card's
    numbers); a resample missing a class gives that metric NaN and is dropped for it.
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in metrics}
    for _ in range(resamples):
        chosen = rng.integers(0, len(labels), len(labels))
        values = classification_metrics(labels[chosen], probs[chosen])
        for name in metrics:
            draws[name].append(values[name])
    tail = (1 - confidence) / 2 * 100
    intervals = {}
    for name, values in draws.items():
        finite = np.asarray([value for value in values if np.isfinite(value)])
        intervals[name] = ((float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail)))
                           if finite.size else (float("nan"), float("nan")))
    return intervals
