"""The aggregator under SecAgg+: the same federation, but it only ever sees the sum of the updates.

``federation.secure_aggregation: true`` runs `SecureFederation`: the round loop, central
evaluation, metrics, ledger, checkpoints, resume and privacy report are `Federation`'s;
only a round's training and the federated evaluation differ. In Flower 1.32 SecAgg+ exists
for the legacy API only, so a round runs Flower's `SecAggPlusWorkflow` over a legacy
`FedAvg` (weighted by the sites' examples) inside a `LegacyContext`, and the sites run
``clients.secure_aggregation``.

What the server learns in a round:
- the weighted sum of the sites' parameters and the sum of their weights (number of
  examples), hence the FedAvg aggregate -- never one site's parameters, as long as fewer
  than ``threshold`` sites collude with it. With per-site DP-SGD each site's update is
  already noised; the server sees the sum of those noised updates.
- the fit metrics, in clear: SecAgg+ aggregates parameters only. They carry the privacy row
  (site id, status, epsilon, delta, steps, noise multiplier, sample rate, budget) and the
  training loss. None is secret: the privacy ledger publishes them anyway, and the ledger
  needs one row per site.

Protocol parameters, derived from the number of sampled sites ``n`` (at least 3: with two,
the sum minus one's own update is the other's update):
- ``num_shares = n``: every site shares its secrets with every other one (the full graph; a
  federation of hospitals is small, so the quadratic cost does not matter);
- ``reconstruction_threshold = n // 2 + 1``: a majority of sites must help to unmask, so the
  server plus a minority cannot reconstruct a site's masks; up to ``n - threshold`` sites
  may drop out of a round and the sum of the others is still recovered;
- ``max_weight = MAX_SITE_EXAMPLES``: each site's parameters are scaled by its share of this
  weight before quantisation, so the aggregate's quantisation error is about
  ``n * 2 * clipping_range / quantization_range * MAX_SITE_EXAMPLES / sum(examples)`` per
  parameter (below 1e-3 for three sites of 50 images, far below the DP noise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_evaluate_workflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from common.config import ExperimentConfig, FederationConfig
from common.errors import ConfigError
from common.runs import RunDirectory
from common.site_report import REFUSED, SiteReport
from server.federation import Federation, RoundObserver, RoundReplies, UpdateObserver, ledger_row
from server.strategy import sampled_per_round

MAX_SITE_EXAMPLES = 10_000
"""SecAgg+'s ``max_weight``: the most training images one site may hold (CBIS-DDSM has about
3,000 in all); a larger site's weighted parameters would be clipped before quantisation."""

LEGACY_CLIENT_DP_WRAPPERS = {
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}


def weighted_average(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Every numeric metric averaged over the sites, weighted by their number of examples."""
    total = sum(num_examples for num_examples, _ in results)
    keys = {key for _, metrics in results for key, value in metrics.items() if isinstance(value, int | float)}
    return {key: sum(n * float(metrics[key]) for n, metrics in results if key in metrics) / total
            for key in sorted(keys)} if total else {}


def sampled_sites(federation: FederationConfig, num_sites: int) -> int:
    """How many sites a round samples (legacy FedAvg's rule); SecAgg+ needs at least three."""
    sampled = sampled_per_round(federation, num_sites)
    if sampled < 3:
        raise ConfigError(
            f"federation.secure_aggregation needs at least 3 sites per round, but {num_sites} site(s) at "
            f"fraction_train {federation.fraction_train} give {sampled}: with two, the sum minus one's own "
            f"update is the other's; add sites or raise fraction_train / min_train_sites"
        )
    return sampled


def legacy_strategy(federation: FederationConfig, sampled: int, num_sites: int) -> Strategy:
    """Legacy FedAvg weighted by examples (FedProx's proximal term is the sites'), with client-side DP if asked."""
    proximal_mu = federation.proximal_mu if federation.strategy == "fedprox" else 0.0
    strategy: Strategy = FedAvg(
        fraction_fit=federation.fraction_train,
        fraction_evaluate=federation.fraction_evaluate,
        min_fit_clients=sampled,
        min_evaluate_clients=min(federation.min_train_sites, num_sites) if federation.fraction_evaluate else 0,
        min_available_clients=min(federation.min_available_sites, num_sites),
        on_fit_config_fn=lambda server_round: {"server-round": server_round, "proximal-mu": proximal_mu},
        on_evaluate_config_fn=lambda server_round: {"server-round": server_round},
        evaluate_metrics_aggregation_fn=weighted_average,
    )
    client_dp = federation.client_dp
    if client_dp.mode == "off":
        return strategy
    wrapper = LEGACY_CLIENT_DP_WRAPPERS[client_dp.mode]  # server-side clipping is refused by the config
    norm = {"clipping_norm" if client_dp.mode == "client-fixed" else "initial_clipping_norm": client_dp.clipping_norm}
    return wrapper(strategy, noise_multiplier=client_dp.noise_multiplier, num_sampled_clients=sampled, **norm)


class RoundRecorder(Strategy):
    """Wraps the legacy strategy and keeps what `Federation` needs of a round: the ledger rows
    (from the fit metrics, which SecAgg+ leaves in clear), the training loss and the federated
    evaluation. Refusals (zero weight, see ``clients.secure_aggregation``) are recorded and
    left out of the aggregate; sampled sites without a result are recorded as failed."""

    def __init__(self, strategy: Strategy, site_of_node: dict[int, str]) -> None:
        self.strategy, self.site_of_node = strategy, site_of_node
        self.replies, self.train_loss, self.evaluation = RoundReplies(), float("nan"), {}
        self.sampled: list[int] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        self.sampled = [proxy.node_id for proxy, _ in instructions]
        return instructions

    def record_results(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]) -> None:
        """The ledger rows and training loss of a round's replies; sampled sites that sent none failed."""
        for proxy, fit_res in results:
            row = ledger_row(server_round, fit_res.metrics, fit_res.metrics)
            self.site_of_node[proxy.node_id] = row["site"]
            self.replies.ledger_rows.append(row)
        trained = self.trained(results)
        if trained:
            self.train_loss = float(weighted_average(
                [(fit_res.num_examples, fit_res.metrics) for _, fit_res in trained]).get("train_loss", float("nan")))
        self.record_failures(server_round, {proxy.node_id for proxy, _ in results},
                             "; ".join(str(failure) for failure in failures)[:200])

    @staticmethod
    def trained(results: list[tuple[ClientProxy, FitRes]]) -> list[tuple[ClientProxy, FitRes]]:
        return [(proxy, fit_res) for proxy, fit_res in results if fit_res.metrics.get("status") != REFUSED]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The inner strategy's aggregate of the sites that trained (every result holds SecAgg+'s aggregate)."""
        trained = self.trained(results)
        return self.strategy.aggregate_fit(server_round, trained, failures) if trained else (None, {})

    def record_failures(self, server_round: int, answered: set[int], reason: str) -> None:
        for node_id in self.sampled:
            if node_id not in answered:
                site = self.site_of_node.get(node_id, f"node-{node_id}")
                self.replies.ledger_rows.append(SiteReport.failed(
                    site, server_round, f"dropped out of the SecAgg+ round ({reason or 'no reply'})").ledger_row())

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = self.strategy.aggregate_evaluate(server_round, results, failures)
        self.evaluation = {key: float(value) for key, value in metrics.items() if key.startswith("val_")}
        return loss, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None  # the central evaluation is Federation's


class RecordingSecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ that hands the sites' fit results (clear metrics, masked parameters) to the
    recorder as soon as they arrive: a round abandoned at unmasking (too many sites gone)
    still records who trained and so spent privacy budget."""

    def __init__(self, recorder: RoundRecorder, sampled: int) -> None:
        super().__init__(num_shares=sampled, reconstruction_threshold=sampled // 2 + 1, max_weight=MAX_SITE_EXAMPLES)
        self.recorder = recorder

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        proceed = super().collect_masked_vectors_stage(grid, context, state)
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        self.recorder.record_results(server_round, state.legacy_results, state.failures)
        return proceed


class SecureFederation(Federation):
    """`Federation` whose rounds train and evaluate through SecAgg+ and the legacy strategy."""

    def __init__(self, grid: Grid, context: Context, config: ExperimentConfig, run: RunDirectory, *,
                 observer: RoundObserver | None = None, log: Callable[[str], None] = print,
                 update_observer: UpdateObserver | None = None) -> None:
        super().__init__(grid, config, run, observer=observer, log=log, update_observer=update_observer)
        self.context = context

    def visible_updates(self, outcome: RoundReplies) -> dict[str, ArrayRecord]:
        """None: under SecAgg+ the aggregator sees each round's sum only."""
        return {}

    def connect(self) -> None:
        """The legacy context over the grid's sites, kept current by Flower's node-registry thread."""
        federation = self.config.federation
        num_sites = max(len(list(self.grid.get_node_ids())), federation.min_available_sites)
        sampled = sampled_sites(federation, num_sites)
        self.recorder = RoundRecorder(legacy_strategy(federation, sampled, num_sites), self.site_of_node)
        self.workflow = RecordingSecAggPlus(self.recorder, sampled)
        self.legacy = LegacyContext(self.context, config=ServerConfig(num_rounds=federation.rounds),
                                    strategy=self.recorder, client_manager=SimpleClientManager())
        self.registry, self.stop_registry, registered = start_update_client_manager_thread(
            self.grid, self.legacy.client_manager)
        registered.wait()

    def run_rounds(self) -> dict[str, Any]:
        try:
            return super().run_rounds()
        finally:
            if hasattr(self, "registry"):
                self.stop_registry.set()
                self.registry.join()

    def train_round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord | None, float, RoundReplies]:
        """One SecAgg+ round; the aggregate comes back under `arrays`' names and dtypes."""
        self.recorder.replies, self.recorder.train_loss, self.recorder.sampled = RoundReplies(), float("nan"), []
        self._publish(server_round, arrays)
        self.workflow(self.grid, self.legacy)
        if not self.recorder.replies.ledger_rows:  # the protocol halted before the sites trained
            self.recorder.record_failures(server_round, set(), "too few sites for the reconstruction threshold")
        aggregated = self.legacy.state.array_records[MAIN_PARAMS_RECORD]
        named = None if aggregated is arrays else named_like(arrays, aggregated)
        return named, self.recorder.train_loss, self.recorder.replies

    def _federated_evaluation(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        if not self.config.federation.fraction_evaluate:
            return {}
        self.recorder.evaluation = {}
        self._publish(server_round, arrays)
        default_evaluate_workflow(self.grid, self.legacy)
        return self.recorder.evaluation

    def _publish(self, server_round: int, arrays: ArrayRecord) -> None:
        """Where Flower's legacy workflows read the round and the global model from."""
        self.legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
        self.legacy.state.array_records[MAIN_PARAMS_RECORD] = arrays


def named_like(template: ArrayRecord, aggregated: ArrayRecord) -> ArrayRecord:
    """`aggregated` (legacy, unnamed, float64 after dequantisation) with `template`'s names and dtypes."""
    return ArrayRecord({
        name: Array(np.asarray(array).astype(original.dtype))
        for name, original, array in zip(template.keys(), template.to_numpy_ndarrays(),
                                         aggregated.to_numpy_ndarrays(), strict=True)
    })
