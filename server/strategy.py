"""The aggregation strategy a config asks for: Flower's own implementations, wrapped as needed.

FedAvg, FedProx and FedAdam are weighted by each site's number of training examples
(Flower's ``num-examples`` key). Client-level DP wraps the strategy with Flower's clipping
wrappers: it bounds what one whole site's update can change, a guarantee about sites,
on top of the per-image DP-SGD each site runs itself.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from common.config import FederationConfig
from common.errors import ConfigError

CLIENT_DP_WRAPPERS = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}


def build_strategy(federation: FederationConfig, *, num_sites: int) -> Strategy:
    """The configured strategy over `num_sites` sites, with client-level DP if asked."""
    common = dict(
        fraction_train=federation.fraction_train,
        fraction_evaluate=federation.fraction_evaluate,
        min_train_nodes=min(federation.min_train_sites, num_sites),
        min_evaluate_nodes=min(federation.min_train_sites, num_sites) if federation.fraction_evaluate else 0,
        min_available_nodes=min(federation.min_available_sites, num_sites),
    )
    if federation.strategy == "fedprox":
        strategy: Strategy = FedProx(proximal_mu=federation.proximal_mu, **common)
    elif federation.strategy == "fedadam":
        strategy = FedAdam(eta=federation.server_learning_rate, **common)
    else:
        strategy = FedAvg(**common)
    client_dp = federation.client_dp
    if client_dp.mode == "off":
        return strategy
    sampled = max(round(federation.fraction_train * num_sites), common["min_train_nodes"])
    wrapper = CLIENT_DP_WRAPPERS[client_dp.mode]
    if client_dp.mode.endswith("fixed"):
        return wrapper(strategy, noise_multiplier=client_dp.noise_multiplier,
                       clipping_norm=client_dp.clipping_norm, num_sampled_clients=sampled)
    adaptive = {"clipped_count_stddev": client_dp.clipped_count_stddev} if client_dp.clipped_count_stddev else {}
    try:
        return wrapper(strategy, noise_multiplier=client_dp.noise_multiplier,
                       initial_clipping_norm=client_dp.clipping_norm, num_sampled_clients=sampled, **adaptive)
    except ValueError as exc:
        # Adaptive clipping spends part of the noise on the count of clipped updates; with
        # Flower's default count noise (sampled sites / 20) few sites cannot afford much noise.
        raise ConfigError(
            f"federation.client_dp: adaptive clipping over {sampled} sampled sites cannot reach noise_multiplier "
            f"{client_dp.noise_multiplier} with clipped_count_stddev "
            f"{client_dp.clipped_count_stddev or sampled / 20:g}; set client_dp.clipped_count_stddev to at least "
            f"{client_dp.noise_multiplier / 2:g} (half the noise multiplier) or lower the noise multiplier") from exc
