"""SecAgg+ (``federation.secure_aggregation``): the server sees masked vectors and recovers their sum.

Two levels: the protocol itself -- our server side (strategy, workflow parameters, ledger
recorder) against sites behind Flower's ``secaggplus_mod``, wired by an in-process grid that
keeps every message the server receives -- and a 3-site x 2-round DP federation in Flower's
simulation engine.
"""

import copy
import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from test_federated import federated_config

from common.config import FederationConfig, parse_config
from common.errors import ConfigError
from server.privacy_ledger import PrivacyLedger
from server.secure_aggregation import (
    MAX_SITE_EXAMPLES,
    RecordingSecAggPlus,
    RoundRecorder,
    legacy_strategy,
    sampled_sites,
)

RUN_ID = 7


class FixedUpdateSite(NumPyClient):
    """A site whose update is known in advance; a refusing site reports zero examples, as ours do."""

    def __init__(self, site_id: str, update: list[np.ndarray], num_examples: int) -> None:
        self.site_id, self.update, self.num_examples = site_id, update, num_examples

    def client_fn(self, context: Context):
        return self.to_client()

    def fit(self, parameters, config):
        status = "trained" if self.num_examples else "refused"
        privacy = {"site-id": self.site_id, "status": status, "epsilon": 1.5}
        if not self.num_examples:
            privacy["reason"] = "budget"
        return self.update, self.num_examples, {"train_loss": 0.5, **privacy}


class InProcessGrid:
    """Delivers each message to the site's ClientApp (with its own Context) and keeps the replies."""

    def __init__(self, sites: dict[int, FixedUpdateSite]) -> None:
        self.apps = {node_id: ClientApp(client_fn=site.client_fn, mods=[secaggplus_mod]) for node_id, site in sites.items()}
        self.contexts = {node_id: Context(run_id=RUN_ID, node_id=node_id, node_config={}, state=RecordDict(),
                                          run_config={}) for node_id in sites}
        self.received: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:  # copies, as if serialised: the mod consumes its config in place
            node_id = message.metadata.dst_node_id
            delivered = Message(copy.deepcopy(message.content), dst_node_id=node_id,
                                message_type=message.metadata.message_type, group_id=message.metadata.group_id)
            replies.append(copy.deepcopy(self.apps[node_id](delivered, self.contexts[node_id])))
        self.received += replies
        return replies


def secure_round(updates: list[list[np.ndarray]], examples: list[int]):
    """One SecAgg+ round of our server side over sites with the given updates and weights."""
    sites = {100 + index: FixedUpdateSite(f"site-0{index + 1}", update, n)
             for index, (update, n) in enumerate(zip(updates, examples))}
    grid = InProcessGrid(sites)
    federation = FederationConfig(min_train_sites=len(sites), min_available_sites=len(sites), fraction_evaluate=0.0)
    sampled = sampled_sites(federation, len(sites))
    recorder = RoundRecorder(legacy_strategy(federation, sampled, len(sites)), {})
    context = LegacyContext(Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=recorder, client_manager=SimpleClientManager())
    for node_id in sites:
        context.client_manager.register(GridClientProxy(node_id=node_id, grid=grid, run_id=RUN_ID))
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros_like(a) for a in updates[0]])

    RecordingSecAggPlus(recorder, sampled)(grid, context)

    aggregate = context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    masked = [[bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
              for reply in grid.received
              if Key.MASKED_PARAMETERS in reply.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    return aggregate, masked, recorder


def quantisation_tolerance(examples: list[int], clipping_range: float = 8.0, quantization_range: int = 2**22) -> float:
    """Each site's weighted parameters are rounded to a grid of step 2c/Q; the average divides by the weights."""
    step = 2 * clipping_range / quantization_range
    return len(examples) * step * MAX_SITE_EXAMPLES / sum(examples)


@pytest.fixture
def updates():
    generator = np.random.default_rng(3)
    return [[generator.normal(size=(4, 5)).astype(np.float32), generator.normal(size=7).astype(np.float32)]
            for _ in range(3)]


def test_the_server_receives_masked_vectors_whose_sum_is_the_weighted_average(updates):
    examples = [40, 60, 100]

    aggregate, masked, recorder = secure_round(updates, examples)

    plain = [sum(n * update[layer] for n, update in zip(examples, updates)) / sum(examples) for layer in range(2)]
    for layer in range(2):
        np.testing.assert_allclose(aggregate[layer], plain[layer], atol=quantisation_tolerance(examples))
    assert len(masked) == 3
    for vector, update, n in zip(masked, updates, examples):
        # What a site without masks would send: its quantised weighted update (after the weight entry).
        clear = np.round((np.clip(update[0] * n / MAX_SITE_EXAMPLES, -8, 8) + 8) * 2**22 / 16)
        assert np.abs(vector[1].astype(np.float64) - clear).mean() > 2**22  # uniform masks over [0, 2^32)
    assert [row["status"] for row in recorder.replies.ledger_rows] == ["trained"] * 3
    assert recorder.train_loss == pytest.approx(0.5)


def test_a_refusing_site_adds_zero_weight_and_its_refusal_reaches_the_ledger(updates):
    examples = [40, 60, 0]

    aggregate, masked, recorder = secure_round(updates, examples)

    plain = [(40 * updates[0][layer] + 60 * updates[1][layer]) / 100 for layer in range(2)]
    for layer in range(2):
        np.testing.assert_allclose(aggregate[layer], plain[layer], atol=quantisation_tolerance(examples))
    assert len(masked) == 3  # the refusing site stays in the protocol: no mask reconstruction
    rows = sorted(recorder.replies.ledger_rows, key=lambda row: row["site"])
    assert [(row["site"], row["status"]) for row in rows] == [
        ("site-01", "trained"), ("site-02", "trained"), ("site-03", "refused")]
    assert rows[2]["reason"] == "budget" and rows[2]["epsilon"] == 1.5


def test_server_side_clipping_and_fedadam_are_refused_with_secure_aggregation(tmp_path):
    with pytest.raises(ConfigError, match="client_dp.mode 'server-adaptive'.*'client-fixed'"):
        federated_config(tmp_path, federation={"secure_aggregation": True, "client_dp": {"mode": "server-adaptive"}})
    with pytest.raises(ConfigError, match="strategy 'fedavg' or 'fedprox'"):
        parse_config({"name": "x", "federation": {"secure_aggregation": True, "strategy": "fedadam"}})
    assert federated_config(tmp_path, federation={"secure_aggregation": True, "client_dp": {"mode": "client-fixed"}})


def test_two_sites_are_too_few_for_secure_aggregation():
    with pytest.raises(ConfigError, match="at least 3 sites"):
        sampled_sites(FederationConfig(secure_aggregation=True), 2)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    from simulations.federated import simulate

    # A fixed noise level with room for both rounds, except at site-03 whose budget allows none.
    config = federated_config(tmp_path_factory.mktemp("secure"), federation={"secure_aggregation": True}, privacy={
        "target_epsilon": None, "noise_multiplier": 1.0, "budget_epsilon": 50.0, "site_budgets": {"site-03": 0.05}})
    return simulate(config, log=lambda message: None)


@pytest.mark.slow
def test_a_dp_federation_under_secure_aggregation_trains_every_round_past_a_refusing_site(secure_run):
    from common.models.classifier import load_checkpoint

    rounds = [row for row in secure_run.run.read_metrics() if "round" in row]
    assert [row["round"] for row in rounds] == [1, 2]
    assert all((row["sites_trained"], row["sites_refused"], row["sites_failed"]) == (2, 1, 0) for row in rounds)
    # A private site sends no training loss (a noise-free statistic of its images): the round has none.
    assert all(row["train_loss"] is None and row["val_loss"] > 0 and 0 <= row["test_accuracy"] <= 1
               for row in rounds)
    _, extra = load_checkpoint(secure_run.run.model_dir / "last.pt")
    assert extra["round"] == 2 and (secure_run.run.model_dir / "best.pt").is_file()
    rows = PrivacyLedger(secure_run.run.root / "privacy").rows()
    status = {(row["site"], row["round"]): row["status"] for row in rows}
    assert status == {(site, server_round): "refused" if site == "site-03" else "trained"
                      for site in ("site-01", "site-02", "site-03") for server_round in (1, 2)}
    assert all(0 < row["epsilon"] <= 50.0 for row in rows if row["status"] == "trained")
    assert all("budget 0.05" in row["reason"] for row in rows if row["status"] == "refused")
    assert json.loads((secure_run.run.root / "privacy" / "report.json").read_text())["sites"]


def test_a_simulation_with_too_few_sites_for_secagg_is_refused_before_it_starts(tmp_path):
    from simulations.federated import simulate

    config = federated_config(tmp_path, federation={"secure_aggregation": True},
                              data={"synthetic": {"sites": 2, "per_site": 8, "size": 64, "burned_in_text": 0.0}})

    with pytest.raises(ConfigError, match="at least 3 sites per round"):
        simulate(config, log=lambda message: None)
    assert not (tmp_path / "runs").exists()
