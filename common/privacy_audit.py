"""The statistics of an empirical privacy audit: one-run epsilon lower bounds and membership inference.

One-run auditing (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training
run"): m canaries are each included in the training data with probability 1/2 from fresh
randomness; after the run an attacker scores every canary and guesses "included" for the
k highest scores and "excluded" for the k lowest, abstaining on the rest. If the training
is (epsilon, delta)-DP, the number of correct guesses among those r = 2k is stochastically
dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta term (their Theorem 3.1, with
the delta correction of their Proposition 5.2): a count too large for that tail rejects
(epsilon, delta)-DP. The lower bound is the largest epsilon so rejected at the confidence
asked.

How many guesses to make is fixed in advance here (`GUESS_FRACTIONS`) and the bound is the
best over those few choices with a Bonferroni correction: picking k after seeing the scores
and reporting the best would overstate the confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binom
from sklearn.metrics import roc_auc_score

GUESS_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
"""The fractions of the m canaries guessed on (half "in" at the top scores, half "out" at the bottom)."""


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[at least `correct` of `guesses` right] for an (epsilon, delta)-DP run auditing m canaries.

    Steinke et al.'s bound: the Binomial(r, q) tail for q = e^eps / (1 + e^eps), plus
    2 m delta times the largest ratio P[v - i <= Binomial < v] / i.
    """
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({m})")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return min(1.0, beta)
    steps = np.arange(1, correct + 1)
    below = np.cumsum(binom.pmf(correct - steps, guesses, q))  # P[v - i <= Binomial < v], i = 1..v
    return min(1.0, beta + float((below / steps).max()) * delta * 2 * m)


def epsilon_lower_bound(m: int, guesses: int, correct: int, *, delta: float, alpha: float) -> float:
    """The largest epsilon whose (epsilon, delta)-DP the guesses reject at level `alpha` (0 if none)."""
    if guesses == 0 or p_value(m, guesses, correct, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, guesses, correct, high, delta) < alpha:
        low, high = high, high * 2
        if high > 1e3:  # every guess right, tiny delta: the data cannot bound epsilon from above
            return low
    for _ in range(50):
        middle = (low + high) / 2
        if p_value(m, guesses, correct, middle, delta) < alpha:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class AuditBound:
    """An attacker's result: the bound and the guesses that gave it."""

    epsilon_lower_bound: float
    canaries: int
    included: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    canary_auc: float

    def as_dict(self) -> dict:
        return asdict(self)


def audit_bound(scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95,
                fractions: Sequence[float] = GUESS_FRACTIONS) -> AuditBound:
    """The one-run lower bound of an attacker whose higher `scores` mean "more likely included"."""
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(included, dtype=bool)
    m = len(scores)
    if m == 0 or len(truth) != m:
        raise ValueError(f"need one inclusion bit per score: {m} scores, {len(truth)} bits")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite")
    order = np.argsort(-scores, kind="stable")
    alpha = (1.0 - confidence) / len(fractions)  # Bonferroni over the guess counts tried
    best = (0.0, 0, 0)
    for fraction in fractions:
        k = max(1, int(round(fraction * m / 2)))
        top, bottom = order[:k], order[m - k:]
        if k * 2 > m:
            continue
        correct = int(truth[top].sum() + (~truth[bottom]).sum())
        bound = epsilon_lower_bound(m, 2 * k, correct, delta=delta, alpha=alpha)
        if bound > best[0] or best[1] == 0:
            best = (bound, 2 * k, correct)
    return AuditBound(epsilon_lower_bound=best[0], canaries=m, included=int(truth.sum()), guesses=best[1],
                      correct=best[2], confidence=confidence, delta=delta, canary_auc=roc_auc(scores, truth))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of "higher score = positive" (ties count one half); nan without both classes."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, np.asarray(scores, dtype=np.float64)))


@dataclass(frozen=True)
class MembershipInference:
    """A loss-threshold membership attack on ordinary images: training (members) against held-out."""

    auc: float
    tpr_at_1pct_fpr: float
    members: int
    non_members: int

    def as_dict(self) -> dict:
        return asdict(self)


def membership_inference(member_scores: Sequence[float], non_member_scores: Sequence[float]) -> MembershipInference:
    """AUC and the true-positive rate at 1% false positives of "higher score = member"."""
    members = np.asarray(member_scores, dtype=np.float64)
    others = np.asarray(non_member_scores, dtype=np.float64)
    scores = np.concatenate([members, others])
    truth = np.concatenate([np.ones(len(members), bool), np.zeros(len(others), bool)])
    if not len(others) or not len(members):
        return MembershipInference(float("nan"), float("nan"), len(members), len(others))
    # The threshold that lets through at most 1% of the non-members.
    allowed = int(math.floor(0.01 * len(others)))
    ranked = np.sort(others)[::-1]
    threshold = ranked[allowed] if allowed < len(ranked) else -np.inf
    tpr = float((members > threshold).mean())
    return MembershipInference(roc_auc(scores, truth), tpr, len(members), len(others))
