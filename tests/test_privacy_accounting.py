"""Our epsilons agree with Google's dp-accounting, and a site's budget survives rounds and restarts."""

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

from clients.privacy import BudgetExhaustedError, SitePrivacyState, epsilon_of
from common.config import PrivacyConfig

DELTA = 1e-5
HISTORIES = [
    [(0.949, 0.5, 4)],
    [(1.1, 0.05, 200)],
    [(0.8, 0.01, 1000)],
    [(2.0, 0.2, 50)],
    [(1.0, 0.1, 30), (1.5, 0.05, 120), (1.0, 0.1, 30)],  # rounds with different sampling/noise compose
]


def independent_event(history):
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise)), steps)
        for noise, sample_rate, steps in history
    ])


@pytest.mark.parametrize("history", HISTORIES)
def test_rdp_epsilon_matches_dp_accounting_within_one_percent(history):
    reference = RdpAccountant(RDPAccountant.DEFAULT_ALPHAS)  # same orders, so the same optimisation
    reference.compose(independent_event(history))

    ours = epsilon_of(history, accountant="rdp", delta=DELTA)

    assert ours == pytest.approx(reference.get_epsilon(DELTA), rel=0.01)


@pytest.mark.parametrize("history", HISTORIES)
def test_prv_epsilon_matches_dp_accounting_pld_within_one_percent(history):
    reference = PLDAccountant(value_discretization_interval=1e-4)
    reference.compose(independent_event(history))

    ours = epsilon_of(history, accountant="prv", delta=DELTA)

    assert ours == pytest.approx(reference.get_epsilon(DELTA), rel=0.01)


def privacy(**overrides):
    return PrivacyConfig(**{"enabled": True, "target_epsilon": 3.0, "target_delta": DELTA, **overrides})


def test_planned_noise_spends_the_target_over_the_planned_steps_and_not_more(tmp_path):
    state = SitePrivacyState.load_or_create(tmp_path, "site-01", privacy())

    noise = state.plan_noise(privacy(), sample_rate=0.1, planned_steps=60)
    spent = epsilon_of([(noise, 0.1, 60)], accountant="rdp", delta=DELTA)

    assert 0.97 * 3.0 <= spent <= 3.0
    assert state.plan_noise(privacy(target_epsilon=1.0), sample_rate=0.1, planned_steps=60) == noise  # fixed once


def test_budget_is_kept_on_disk_and_a_restarted_site_still_refuses(tmp_path):
    budget = epsilon_of([(1.0, 0.1, 50)], accountant="rdp", delta=DELTA)  # room for two 20-step rounds
    config = privacy(target_epsilon=None, noise_multiplier=1.0, budget_epsilon=budget)
    state = SitePrivacyState.load_or_create(tmp_path, "site-01", config)
    state.plan_noise(config, sample_rate=0.1, planned_steps=0)
    rounds = 0
    while True:
        try:
            state.check_round(sample_rate=0.1, steps=20)
        except BudgetExhaustedError as refusal:
            assert f"budget {budget:g}" in str(refusal) and "site-01" in str(refusal)
            break
        rounds += 1
        state.record_round(rounds, [*state.history, (1.0, 0.1, 20)])
        state.save(tmp_path)

    restarted = SitePrivacyState.load_or_create(tmp_path, "site-01", config)

    assert rounds == 2 and restarted.rounds_trained == [1, 2]
    assert restarted.spent_epsilon == pytest.approx(state.spent_epsilon) and restarted.spent_epsilon <= budget
    with pytest.raises(BudgetExhaustedError):
        restarted.check_round(sample_rate=0.1, steps=20)


def test_per_site_budgets_override_the_default(tmp_path):
    config = privacy(site_budgets={"site-02": 0.5})
    assert SitePrivacyState.load_or_create(tmp_path / "a", "site-02", config).budget_epsilon == 0.5
    assert SitePrivacyState.load_or_create(tmp_path / "b", "site-01", config).budget_epsilon == 3.0
