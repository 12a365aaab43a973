"""Client-level DP: Flower's clipping wrappers bound how far one round can move the global model.

With the noise set to zero the bound is exact: the aggregate of updates each clipped to norm C
has norm at most C, so the global model after round 1 lies within C of the initial one. A few
epochs of unclipped training move it far more (checked too), so the test sees the wrapper act.
"""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy

from common.errors import ConfigError
from common.models.classifier import load_checkpoint
from common.models.configured import classifier_from_config
from common.training import seed_everything
from common.runs import UNIT_WEIGHT
from server.privacy_ledger import client_level_summary
from server.strategy import MeanOverSampledSites, build_strategy
from simulations.federated import simulate
from tests.test_federated import federated_config

CLIP = 1e-3


def round_one_displacement(tmp_path, mode: str) -> float:
    config = federated_config(
        tmp_path, privacy={"enabled": False},
        data={"synthetic": {"sites": 3, "per_site": 20, "size": 64, "seed": 3, "burned_in_text": 0.0}},
        federation={"rounds": 1, "local_epochs": 1, "min_train_sites": 3, "fraction_evaluate": 0.0,
                    "client_dp": {"mode": mode, "noise_multiplier": 0.0, "clipping_norm": CLIP}})
    seed_everything(config.seed)  # what the ServerApp does before it builds the initial model
    initial = classifier_from_config(config).state_dict()
    result = simulate(config, log=lambda message: None)
    assert result.final_metrics["sites_trained"] == 3
    trained, _ = load_checkpoint(result.run.model_dir / "last.pt")
    return float(torch.sqrt(sum(((trained.state_dict()[key].float() - value.float()) ** 2).sum()
                                for key, value in initial.items() if value.is_floating_point())))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
def test_fixed_clipping_bounds_the_global_models_step(tmp_path, mode):
    assert 0 < round_one_displacement(tmp_path, mode) <= CLIP * 1.001


@pytest.mark.slow
def test_without_client_level_dp_the_same_round_moves_the_model_much_further(tmp_path):
    assert round_one_displacement(tmp_path, "off") > 100 * CLIP


@pytest.mark.parametrize("mode, wrapper", [
    ("server-fixed", "DifferentialPrivacyServerSideFixedClipping"),
    ("client-fixed", "DifferentialPrivacyClientSideFixedClipping"),
    ("server-adaptive", "DifferentialPrivacyServerSideAdaptiveClipping"),
    ("client-adaptive", "DifferentialPrivacyClientSideAdaptiveClipping"),
])
def test_each_mode_wraps_the_strategy_in_flowers_matching_wrapper(tmp_path, mode, wrapper):
    config = federated_config(tmp_path, federation={"client_dp": {
        "mode": mode, "noise_multiplier": 0.7, "clipping_norm": 2.0, "clipped_count_stddev": 1.0}})

    strategy = build_strategy(config.federation, num_sites=3)

    assert type(strategy).__name__ == wrapper
    # Adaptive clipping also noises the clipped-update count, so the model's share of noise is
    # raised until both together give the configured multiplier (Andrew et al. 2021, Thm 1).
    expected = 0.7 if mode.endswith("fixed") else (0.7 ** -2 - (2 * 1.0) ** -2) ** -0.5
    assert strategy.noise_multiplier == pytest.approx(expected)


def test_adaptive_clipping_that_cannot_afford_its_noise_is_a_config_error_naming_the_key(tmp_path):
    config = federated_config(tmp_path, federation={"client_dp": {"mode": "server-adaptive", "noise_multiplier": 0.7}})

    with pytest.raises(ConfigError, match="clipped_count_stddev to at least 0.35"):
        build_strategy(config.federation, num_sites=3)


def test_the_noise_is_sized_for_the_sites_flower_actually_samples_and_the_mean_is_unweighted(tmp_path):
    # 0.7 x 5 sites: Flower samples int(3.5) = 3; sizing the noise for round(3.5) = 4 would be too little.
    config = federated_config(tmp_path, federation={"fraction_train": 0.7, "min_train_sites": 1, "client_dp": {
        "mode": "server-fixed", "noise_multiplier": 1.0, "clipping_norm": 1.0}})

    strategy = build_strategy(config.federation, num_sites=5)

    assert strategy.num_sampled_clients == 3
    assert isinstance(strategy.strategy, MeanOverSampledSites)
    assert strategy.strategy.strategy.weighted_by_key == UNIT_WEIGHT


class FixedMean(Strategy):
    """A stand-in inner strategy (pure logic): samples three sites, 'aggregates' to a fixed model."""

    def __init__(self, aggregate):
        self.aggregate = aggregate

    def configure_train(self, server_round, arrays, config, grid):
        return ["message"] * 3

    def aggregate_train(self, server_round, replies):
        return self.aggregate, None

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self):
        pass


def test_a_site_missing_from_the_mean_counts_as_a_zero_update():
    start = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32)), "n": Array(np.array([7]))})
    mean_of_two = ArrayRecord({"w": Array(np.full(4, 3.0, dtype=np.float32)), "n": Array(np.array([9]))})
    strategy = MeanOverSampledSites(FixedMean(mean_of_two))
    strategy.configure_train(1, start, ConfigRecord({}), grid=None)

    aggregated, _ = strategy.aggregate_train(1, ["reply-a", "reply-b"])  # the third site refused or failed

    assert aggregated["w"].numpy().tolist() == [2.0] * 4  # (3 + 3 + 0) / 3
    assert aggregated["n"].numpy().tolist() == [9]  # integer buffers are not means
    full, _ = strategy.aggregate_train(1, ["a", "b", "c"])
    assert full["w"].numpy().tolist() == [3.0] * 4


@pytest.mark.parametrize("noise, rounds", [(1.0, 3), (0.7, 10), (2.5, 50)])
def test_the_client_level_epsilon_matches_dp_accounting(noise, rounds):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant
    from opacus.accountants import RDPAccountant

    rows = [{"round": r, "mode": "server-fixed", "noise_multiplier": noise, "clipping_norm": 1.0, "delta": 1e-5,
             "sampled": 3, "aggregated": 3} for r in range(1, rounds + 1)]
    reference = RdpAccountant(RDPAccountant.DEFAULT_ALPHAS)
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise), rounds))

    summary = client_level_summary(rows)

    assert summary["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=0.01)
    assert summary["rounds"] == list(range(1, rounds + 1))


def test_an_array_no_site_changed_is_kept_bit_for_bit_and_a_changed_one_is_the_aggregate():
    from server.strategy import kept_where_unchanged

    fixed = np.array([0.1, 0.7, 1 / 3], dtype=np.float32)
    sent = ArrayRecord({"fixed": Array(fixed), "head": Array(np.zeros(2, dtype=np.float32))})
    replies = [ArrayRecord({"fixed": Array(fixed.copy()), "head": Array(np.full(2, value, dtype=np.float32))})
               for value in (1.0, 2.0, 4.0)]
    # What a weighted mean makes of the identical arrays: equal only up to rounding.
    drifted = (fixed * np.float32(0.3) + fixed * np.float32(0.3) + fixed * np.float32(0.4)).astype(np.float32)
    aggregated = ArrayRecord({"fixed": Array(drifted), "head": Array(np.full(2, 2.5, dtype=np.float32))})

    kept = kept_where_unchanged(aggregated, sent, replies)

    assert np.array_equal(kept["fixed"].numpy(), fixed)
    assert np.array_equal(kept["head"].numpy(), np.full(2, 2.5, dtype=np.float32))
