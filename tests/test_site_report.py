"""One record of what a site reports per round: what the site sends is what the ledger reads."""

from __future__ import annotations

import pytest

from common.site_report import FAILED, REFUSED, TRAINED, SiteReport


def test_a_trained_report_travels_and_becomes_the_ledger_row():
    sent = SiteReport("site-01", TRAINED, images=120, steps=4, sample_rate=0.25, noise_multiplier=1.1,
                      max_grad_norm=1.0, epsilon=2.5, delta=1e-5, budget_epsilon=8.0, accountant="rdp",
                      budget_bound="site", unit="image")
    metrics, privacy = sent.wire()

    assert metrics == {"num-examples": 120, "steps": 4, "sample_rate": 0.25, "noise_multiplier": 1.1,
                       "max_grad_norm": 1.0, "epsilon": 2.5, "delta": 1e-5, "budget_epsilon": 8.0}
    assert privacy == {"site-id": "site-01", "status": "trained", "accountant": "rdp", "budget-bound": "site",
                       "unit": "image"}
    row = SiteReport.from_wire(3, metrics, privacy).ledger_row()
    assert row == {"site": "site-01", "round": 3, "status": "trained", "steps": 4, "sample_rate": 0.25,
                   "noise_multiplier": 1.1, "max_grad_norm": 1.0, "epsilon": 2.5, "delta": 1e-5,
                   "budget_epsilon": 8.0, "images": 120, "accountant": "rdp", "budget_bound": "site", "unit": "image"}


def test_a_refusal_carries_its_reason_and_spent_epsilon_and_no_images():
    metrics, privacy = SiteReport("site-02", REFUSED, epsilon=7.9, reason="budget spent").wire()

    row = SiteReport.from_wire(5, {**metrics, "unit-weight": 1}, privacy).ledger_row()

    assert row == {"site": "site-02", "round": 5, "status": "refused", "epsilon": 7.9, "reason": "budget spent"}


def test_a_failed_site_has_a_short_reason_and_an_unknown_status_is_refused():
    assert SiteReport.failed("node-7", 2, "x" * 500).ledger_row() == {"site": "node-7", "round": 2,
                                                                      "status": FAILED, "reason": "x" * 200}
    with pytest.raises(ValueError, match="not one of trained, refused, failed"):
        SiteReport("site-01", "done")
