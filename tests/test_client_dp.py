"""Client-level DP: Flower's clipping wrappers bound how far one round can move the global model.

With the noise set to zero the bound is exact: the aggregate of updates each clipped to norm C
has norm at most C, so the global model after round 1 lies within C of the initial one. A few
epochs of unclipped training move it far more (checked too), so the test sees the wrapper act.
"""

import pytest
import torch

from common.errors import ConfigError
from common.models.classifier import load_checkpoint
from common.models.configured import classifier_from_config
from common.training import seed_everything
from server.strategy import build_strategy
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
