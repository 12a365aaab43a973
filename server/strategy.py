"""The aggregation strategy a config asks for: Flower's own implementations, wrapped as needed.

FedAvg, FedProx and FedAdam are weighted by each site's number of training examples
(Flower's ``num-examples`` key). Client-level DP wraps the strategy with Flower's clipping
wrappers: it bounds what one whole site's update can change, a guarantee about sites,
on top of the per-image DP-SGD each site runs itself.

Flower's wrappers size the noise for sensitivity C / m, m the number of sampled sites, which
holds only for an unweighted mean over all m: under client-level DP the mean is unweighted
(every reply's ``unit-weight`` is 1) and `MeanOverSampledSites` counts a site that refused or
failed as a zero update, so the denominator never drops below the m the noise assumes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
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
from common.runs import UNIT_WEIGHT

CLIENT_DP_WRAPPERS = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}


def sampled_per_round(federation: FederationConfig, num_sites: int) -> int:
    """How many sites Flower's strategies sample a round: int(fraction x sites), at least the minimum."""
    return max(int(federation.fraction_train * num_sites), min(federation.min_train_sites, num_sites))


def scaled_update(aggregated: ArrayRecord, start: ArrayRecord, factor: float) -> ArrayRecord:
    """start + factor x (aggregated - start), array by array (integer buffers are left as aggregated)."""
    scaled = {}
    for (name, after), before in zip(aggregated.items(), start.to_numpy_ndarrays(), strict=True):
        values = after.numpy()
        if np.issubdtype(values.dtype, np.floating):
            values = (before + factor * (values - before)).astype(values.dtype)
        scaled[name] = Array(np.asarray(values))
    return ArrayRecord(scaled)


def kept_where_unchanged(aggregated: ArrayRecord, sent: ArrayRecord, replies: Iterable[ArrayRecord]) -> ArrayRecord:
    """The aggregate, with every array that no site changed set back to exactly what was sent.

    A weighted mean of identical float arrays is that array only up to rounding: frozen
    weights, fixed filters and held BatchNorm statistics would drift in their last bits round
    after round, and every cache keyed by them (`common.data.features`) would miss. A
    function of the replies alone, so under site-level DP it is post-processing.
    """
    replies = [dict(reply.items()) for reply in replies]
    kept = {}
    for name, value in aggregated.items():
        before = sent[name].numpy() if name in sent else None
        unchanged = before is not None and all(
            name in reply and np.array_equal(reply[name].numpy(), before) for reply in replies)
        kept[name] = Array(np.asarray(before)) if unchanged else value
    return ArrayRecord(kept)


class MeanOverSampledSites(Strategy):
    """The inner strategy's mean taken over every sampled site, a missing reply counting as a zero update.

    With k of m sampled sites aggregated, the mean's step from the global model is scaled by
    k / m: one site then moves the aggregate by at most C / m, what the noise is sized for.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.arrays: ArrayRecord | None = None
        self.sampled = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.arrays, self.sampled = arrays, len(messages)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        if aggregated is None or self.arrays is None or len(replies) >= self.sampled:
            return aggregated, metrics
        return scaled_update(aggregated, self.arrays, len(replies) / self.sampled), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


def build_strategy(federation: FederationConfig, *, num_sites: int) -> Strategy:
    """The configured strategy over `num_sites` sites, with client-level DP if asked."""
    client_dp = federation.client_dp
    common = dict(
        fraction_train=federation.fraction_train,
        fraction_evaluate=federation.fraction_evaluate,
        min_train_nodes=min(federation.min_train_sites, num_sites),
        min_evaluate_nodes=min(federation.min_train_sites, num_sites) if federation.fraction_evaluate else 0,
        min_available_nodes=min(federation.min_available_sites, num_sites),
        weighted_by_key=UNIT_WEIGHT if client_dp.mode != "off" else "num-examples",
    )
    if federation.strategy == "fedprox":
        strategy: Strategy = FedProx(proximal_mu=federation.proximal_mu, **common)
    elif federation.strategy == "fedadam":
        strategy = FedAdam(eta=federation.server_learning_rate, **common)
    else:
        strategy = FedAvg(**common)
    if client_dp.mode == "off":
        return strategy
    strategy = MeanOverSampledSites(strategy)
    sampled = sampled_per_round(federation, num_sites)
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
