"""The aggregator's federation: rounds of train -> aggregate -> evaluate, with a privacy ledger.

The round loop is ours, the strategy is Flower's: each round asks the strategy to sample
sites (``configure_train``), sends the global model, sorts the replies into trained,
refused (budget) and failed sites, lets the strategy aggregate the trained ones, then
evaluates centrally on the held-out test split and federatedly on the sites' validation
splits. Owning the loop is what lets a run record refusals and failures, checkpoint the
best global model with ModelCheckpoint semantics, stop on exhausted budgets and resume.
With ``federation.secure_aggregation`` the same loop runs with SecAgg+ rounds
(``server.secure_aggregation.SecureFederation``). The Flower ServerApp
(``server.server_app``) only picks which of the two runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid

from common.callbacks import ModelCheckpoint
from common.config import ExperimentConfig
from common.data.features import evaluation_input
from common.data.pipeline import load_records
from common.data.records import CLASS_NAMES
from common.losses import build_loss
from common.metrics import unusable_because
from common.models.classifier import load_checkpoint, save_checkpoint
from common.models.configured import classifier_from_config
from common.models.transfer import require_site_free_weights
from common.runs import AppSettings, RunDirectory, app_config, resolve_app_settings
from common.site_report import REFUSED, STATUSES, SiteReport
from common.training import evaluate, select_device
from server.compression import check_compression, compress_run
from server.privacy_ledger import PrivacyLedger, write_report
from server.strategy import build_strategy, kept_where_unchanged

RoundObserver = Callable[[int, dict[str, Any], list[dict[str, Any]]], None]
"""Called after each round with (round, metrics, ledger rows of the round)."""

UpdateObserver = Callable[[int, ArrayRecord, dict[str, ArrayRecord], "ArrayRecord | None"], None]
"""Called after each round's aggregation with what the aggregator saw: (round, the global model it
sent, each trained site's returned model by site id -- empty under SecAgg+ -- and the aggregate).
A privacy audit's aggregator attacker (`simulations.audit`) reads it."""


def settings_for(context: Context, explicit: AppSettings | None) -> AppSettings:
    runs_dir = app_config(context.run_config, explicit).tracking.runs_dir
    return resolve_app_settings(context.run_config, context.run_id, explicit, runs_dir)


@dataclass
class RoundReplies:
    trained: list[Message] = field(default_factory=list)
    ledger_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        statuses = [row["status"] for row in self.ledger_rows]
        return {f"sites_{status}": statuses.count(status) for status in STATUSES}


def sort_replies(server_round: int, replies: list[Message], site_of_node: dict[int, str]) -> RoundReplies:
    """Split replies into trained updates and ledger rows for every site (failed ones too)."""
    outcome = RoundReplies()
    for reply in replies:
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            site = site_of_node.get(node_id, f"node-{node_id}")
            outcome.ledger_rows.append(SiteReport.failed(site, server_round, reply.error.reason).ledger_row())
            continue
        report = SiteReport.from_wire(server_round, reply.content["metrics"], reply.content["privacy"])
        site_of_node[node_id] = report.site
        if report.status != REFUSED:
            outcome.trained.append(reply)
        outcome.ledger_rows.append(report.ledger_row())
    return outcome


def ledger_row(server_round: int, metrics: Mapping[str, Any], privacy: Mapping[str, Any]) -> dict[str, Any]:
    """The privacy ledger's row for one site's reply (`SiteReport`)."""
    return SiteReport.from_wire(server_round, metrics, privacy).ledger_row()


class Federation:
    """One federated run over a Grid, writing the usual run directory."""

    def __init__(self, grid: Grid, config: ExperimentConfig, run: RunDirectory, *,
                 observer: RoundObserver | None = None, log: Callable[[str], None] = print,
                 update_observer: UpdateObserver | None = None) -> None:
        self.grid, self.config, self.run, self.observer, self.log = grid, config, run, observer, log
        self.update_observer = update_observer
        self.device = select_device(config.device)
        self.ledger = PrivacyLedger(run.root / "privacy")
        self.checkpoint = ModelCheckpoint(config.checkpoint, run.model_dir)
        self.site_of_node: dict[int, str] = {}
        records = load_records(config.data)
        self.test_records = [r for r in records if r.split == "test"]
        self.loss_fn = build_loss(config.loss, [1] * len(CLASS_NAMES))

    def run_rounds(self) -> dict[str, Any]:
        """Train, aggregate and evaluate round after round; the aggregator's last step compresses."""
        config = self.config
        if config.compression.enabled:
            check_compression(config, config.compression)  # a bad request fails before any round is spent
        if config.model.pretrained is not None:
            self.ledger.record_pretrained(require_site_free_weights(config.model.pretrained))
        model, start_round = self._initial_model()
        arrays = ArrayRecord(model.state_dict())
        self.connect()
        last_metrics: dict[str, Any] = {}
        for server_round in range(start_round, config.federation.rounds + 1):
            started = time.perf_counter()
            aggregated, train_loss, outcome = self.train_round(server_round, arrays)
            for row in outcome.ledger_rows:
                self.ledger.append(row)
            if self.update_observer is not None:
                self.update_observer(server_round, arrays, self.visible_updates(outcome), aggregated)
            if not outcome.counts["sites_trained"]:
                self.log(f"round {server_round}: no site trained ({outcome.counts}); the run ends")
                break
            if aggregated is not None:
                arrays = aggregated
                self._record_client_level(server_round, outcome)
            model.load_state_dict(arrays.to_torch_state_dict())
            metrics = {"train_loss": train_loss, **outcome.counts}
            tested = evaluate(*evaluation_input(model, self.test_records, config, device=self.device), self.loss_fn,
                              device=self.device)
            metrics |= {f"test_{k}": v for k, v in tested.items()}
            metrics |= self._federated_evaluation(server_round, arrays)
            metrics["seconds"] = round(time.perf_counter() - started, 3)
            self._finish_round(server_round, model, metrics, outcome)
            last_metrics = metrics
            if outcome.counts["sites_refused"] and config.privacy.on_budget_exhausted == "stop":
                self.log(f"round {server_round}: a site's budget is exhausted and privacy.on_budget_exhausted is 'stop'")
                break
        if (config.privacy.enabled or config.federation.client_dp.mode != "off") and self.ledger.path.exists():
            write_report(self.ledger)
        if config.compression.enabled and last_metrics:
            compress_run(self.run.root, config.compression, log=self.log)
        return last_metrics

    def connect(self) -> None:
        """Before the first round: the strategy over the sites the grid has."""
        num_sites = max(len(list(self.grid.get_node_ids())), self.config.federation.min_available_sites)
        self.strategy = build_strategy(self.config.federation, num_sites=num_sites)

    def train_round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord | None, float, RoundReplies]:
        """The sites train on `arrays`: the aggregate (None if there is none), its training loss and the replies."""
        round_config = ConfigRecord({"server-round": server_round})
        messages = self.strategy.configure_train(server_round, arrays, round_config, self.grid)
        outcome = sort_replies(server_round, list(self.grid.send_and_receive(messages)), self.site_of_node)
        if not outcome.trained:
            return None, float("nan"), outcome
        aggregated, train_metrics = self.strategy.aggregate_train(server_round, outcome.trained)
        if aggregated is not None and self.config.federation.client_dp.mode == "off":
            # Under client-level DP the aggregate carries the aggregator's noise everywhere: left as it is.
            aggregated = kept_where_unchanged(aggregated, arrays,
                                              [reply.content["arrays"] for reply in outcome.trained])
        return aggregated, _metric(train_metrics, "train_loss"), outcome

    def visible_updates(self, outcome: RoundReplies) -> dict[str, ArrayRecord]:
        """Each trained site's returned model, as the aggregator receives it."""
        return {str(reply.content["privacy"]["site-id"]): reply.content["arrays"] for reply in outcome.trained}

    def _record_client_level(self, server_round: int, outcome: RoundReplies) -> None:
        """The client-level DP release of a round: the aggregator noised the mean of the sampled sites."""
        client_dp = self.config.federation.client_dp
        if client_dp.mode == "off":
            return
        self.ledger.append_client_level({
            "round": server_round, "mode": client_dp.mode, "noise_multiplier": client_dp.noise_multiplier,
            "clipping_norm": client_dp.clipping_norm, "delta": client_dp.target_delta,
            "sampled": len(outcome.ledger_rows), "aggregated": outcome.counts["sites_trained"]})

    def _initial_model(self) -> tuple[torch.nn.Module, int]:
        """The global model to start from: the last round's on resume, else the configured one."""
        last = self.run.model_dir / "last.pt"
        if last.exists():
            model, extra = load_checkpoint(last)
            if dropped := self.run.forget_rounds_after(int(extra["round"])):
                self.log(f"dropped {dropped} metrics row(s) of a round whose model was never saved")
            best = [row for row in self.run.read_metrics() if "round" in row]
            for row in best:  # replay the monitor so that best.pt is only replaced by a better model
                self.checkpoint.update(row["round"], row, lambda path, optimizer: None)
            self.log(f"resuming after round {extra['round']}")
            return model.to(self.device), int(extra["round"]) + 1
        return classifier_from_config(self.config).to(self.device), 1

    def _federated_evaluation(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        if not self.config.federation.fraction_evaluate:
            return {}
        messages = self.strategy.configure_evaluate(server_round, arrays, ConfigRecord({"server-round": server_round}),
                                                    self.grid)
        replies = [reply for reply in self.grid.send_and_receive(messages) if not reply.has_error()]
        aggregated = self.strategy.aggregate_evaluate(server_round, replies) if replies else None
        return {key: float(value) for key, value in (aggregated or {}).items() if key.startswith("val_")}

    def _finish_round(self, server_round: int, model, metrics: dict[str, Any], outcome: RoundReplies) -> None:
        self.run.log_metrics({"round": server_round, **metrics})
        extra = {"round": server_round, "metrics": metrics, "class_names": list(CLASS_NAMES),
                 "image_size": self.config.model.image_size}
        save_checkpoint(model, self.run.model_dir / "last.pt", **extra)
        self.checkpoint.update(server_round, metrics, lambda path, _: save_checkpoint(model, path, **extra))
        failure = unusable_because(metrics, prefix="test_")
        self.log(f"round {server_round}: {outcome.counts} test_accuracy={metrics['test_accuracy']:.4f} "
                 f"test_macro_auc={metrics['test_macro_auc']:.4f} val_loss={metrics.get('val_loss', float('nan')):.4f}"
                 + (f" -- the global model {failure}" if failure else ""))
        if self.observer is not None:
            self.observer(server_round, metrics, outcome.ledger_rows)


def _metric(record, key: str) -> float:
    return float(record[key]) if record is not None and key in record else float("nan")
