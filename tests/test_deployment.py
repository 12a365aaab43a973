"""A real deployed federation on 127.0.0.1: one SuperLink and three site processes, each its own OS process.

Everything goes through TLS with certificates from `common.certs`, and only enrolled sites may
join. The sites are started as ``mammofl site run`` processes with their own data and state
folders, exactly as a hospital would start one. The tests run in order on one federation:
refusals first, then a two-round DP run, then a run in which one site is killed mid-round
while another, restarted, must remember the budget it already spent; then the killed site
rejoins for a SecAgg+ run, and last the aggregator itself is killed mid-run, restarted, and
the run resumed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from cryptography import x509

from clients.privacy import SitePrivacyState
from common.certs import NodeKeys, TlsFiles, create_node_keys, create_tls_files
from common.config import load_config, parse_config
from common.data.synthetic_dicom import synthesize_dataset
from common.errors import ConfigError
from common.runs import RunDirectory
from mammofl.cli import main
from server.deployment import (
    ENROLMENTS_FILE,
    Deployment,
    DeploymentError,
    enrol_site,
    flower_environment,
    free_port,
    run_federation,
    spawn,
    start_superlink,
    stop,
)
from server.privacy_ledger import PrivacyLedger
from server.superlink_state import read_enrolments

SITES = ("site-01", "site-02", "site-03")
JOINED = "SuperNode ID:"
RUN_TIMEOUT_S = 300  # a run here takes under a minute; a hung one fails in 5 min, not 15


def deployment_config(root: Path, *, name: str, rounds: int, secure_aggregation: bool = False) -> Path:
    """A DP config; site-01 has the default budget (spent by the first run), the others room for every run here."""
    config = parse_config({
        "name": name, "seed": 5, "device": "cpu", "training": "federated", "epochs": 1, "batch_size": 16,
        "learning_rate": 0.003, "num_workers": 0, "encoder": "smallcnn", "verbose": 0, "augmentation": False,
        "validation_split": 0.2, "model": {"image_size": 64},
        "data": {"source": "sites", "root": str(root / "data"), "cache_dir": str(root / "cache")},
        "federation": {"rounds": rounds, "local_epochs": 1, "min_train_sites": 1, "min_available_sites": 3,
                       "fraction_evaluate": 0.0, "secure_aggregation": secure_aggregation},
        "privacy": {"enabled": True, "target_epsilon": 8.0, "max_grad_norm": 1.0,
                    "site_budgets": {"site-02": 100.0, "site-03": 100.0}},
        "tracking": {"runs_dir": str(root / "runs"), "wandb_mode": "disabled"},
    })
    path = root / f"{name}.json"
    path.write_text(config.model_dump_json(indent=2))
    return path


@dataclass
class LoopbackFederation:
    root: Path
    deployment: Deployment
    tls: TlsFiles
    superlink: subprocess.Popen
    sites: dict[str, subprocess.Popen] = field(default_factory=dict)

    def keys(self, site_id: str) -> NodeKeys:
        return NodeKeys.in_folder(self.root / "secrets" / "sites", site_id)

    def state_dir(self, site_id: str) -> Path:
        return self.root / "state" / site_id

    def log(self, site_id: str) -> Path:
        return self.root / "logs" / f"{site_id}.log"

    def start_site(self, site_id: str, *, data_of: str | None = None, auth_key: Path | None = None,
                   plaintext: bool = False, budget_epsilon: float = 100.0) -> subprocess.Popen:
        """``mammofl site run`` in its own process, as a hospital starts it, with its own budget."""
        command = [sys.executable, "-m", "mammofl", "site", "run", "--site-id", site_id,
                   "--budget-epsilon", str(budget_epsilon),
                   "--data", str(self.root / "data" / (data_of or site_id)), "--superlink", self.deployment.fleet_address,
                   "--state-dir", str(self.state_dir(site_id)), "--clientappio-address", f"127.0.0.1:{free_port()}"]
        # Flower itself refuses an authentication key over plaintext, so a plaintext site brings none.
        command += (["--insecure"] if plaintext else
                    ["--root-certificates", str(self.tls.ca_certificate),
                     "--auth-key", str(auth_key or self.keys(site_id).private_key)])
        self.sites[site_id] = spawn(command, self.log(site_id), env=flower_environment(self.root / "flwr"))
        return self.sites[site_id]

    def wait_until_joined(self, site_id: str, *, joins: int = 1, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.log(site_id).read_text().count(JOINED) < joins:
            assert self.sites[site_id].poll() is None, self.log(site_id).read_text()[-2000:]
            assert time.monotonic() < deadline, f"{site_id} did not join within {timeout} s"
            time.sleep(0.5)

    def run(self, config_path: Path | None, **kwargs):
        """`run_federation` here; a run that fails says what every process of the federation
        logged last (CI keeps no files)."""
        try:
            return run_federation(self.deployment, config_path, timeout=RUN_TIMEOUT_S, **kwargs)
        except DeploymentError as error:
            raise DeploymentError(f"{error}\n{self.log_tails()}") from error

    def log_tails(self, lines: int = 25) -> str:
        logs = [*sorted((self.root / "logs").glob("*.log")), *sorted((self.root / "state").glob("*/workers/*.log")),
                self.deployment.folder / "superlink.log"]
        tails = []
        for path in logs:
            if path.is_file():
                text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))
                tails.append(f"--- {path.relative_to(self.root)}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(tails)

    def spent_epsilon(self, site_id: str, config_path: Path) -> float:
        """What the site's own state folder says it has spent."""
        privacy = load_config(config_path).privacy
        return SitePrivacyState.load_or_create(self.state_dir(site_id), site_id, privacy).spent_epsilon


def test_certs_create_a_ca_that_signs_the_superlink_certificate_for_the_given_hosts(tmp_path):
    files = create_tls_files(tmp_path, ["127.0.0.1", "aggregator.example.org"])
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["aggregator.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="already exist"):
        create_tls_files(tmp_path, ["127.0.0.1"])


def test_a_site_key_pair_is_what_flower_enrols_and_signs_with(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    keys = create_node_keys(tmp_path, "site-01")
    assert try_load_public_key(keys.public_key)
    assert load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600


def test_certs_create_on_the_command_line_writes_the_tls_files_and_site_keys(tmp_path):
    assert main(["certs", "create", "--out", str(tmp_path), "--host", "127.0.0.1", "--site", "site-01"]) == 0
    assert TlsFiles.in_folder(tmp_path).require()
    assert NodeKeys.in_folder(tmp_path / "sites", "site-01").public_key.is_file()


def test_site_run_wants_tls_or_an_explicit_insecure(tmp_path, capsys):
    assert main(["site", "run", "--site-id", "site-01", "--budget-epsilon", "8", "--data", str(tmp_path),
                 "--superlink", "127.0.0.1:9092"]) == 2
    assert "--root-certificates" in capsys.readouterr().err


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_also_kills_what_of_the_group_outlives_its_leader(tmp_path):
    # As a ServerApp hung at exit (flushing logs to a SuperLink that is gone) outlived its SuperLink.
    pid_file = tmp_path / "straggler.pid"
    straggler = tmp_path / "straggler.py"
    straggler.write_text("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                         f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    leader = spawn(["bash", "-c", f"'{sys.executable}' '{straggler}' & wait"], tmp_path / "group.log", env=dict(os.environ))
    deadline = time.monotonic() + 30
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the straggler never started"
        time.sleep(0.1)
    pid = int(pid_file.read_text())

    stop(leader)

    assert leader.returncode is not None
    assert not running(pid)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    synthesize_dataset(root / "data", sites=len(SITES), per_site=24, size=64, seed=5, burned_in_text=0.0)
    tls = create_tls_files(root / "secrets", ["127.0.0.1", "localhost"])
    deployment = Deployment(folder=root / "superlink", fleet_address=f"127.0.0.1:{free_port()}",
                            control_address=f"127.0.0.1:{free_port()}", serverappio_address=f"127.0.0.1:{free_port()}",
                            ca_certificate=tls.ca_certificate, node_auth=True)
    superlink = start_superlink(deployment, tls)
    loopback = LoopbackFederation(root=root, deployment=deployment, tls=tls, superlink=superlink)
    try:
        for site_id in SITES:
            enrol_site(deployment, create_node_keys(root / "secrets" / "sites", site_id).public_key)
            loopback.start_site(site_id)
        for site_id in SITES:
            loopback.wait_until_joined(site_id)
        yield loopback
    finally:
        # loopback.superlink, not superlink: a test restarts the SuperLink.
        for process in [*loopback.sites.values(), loopback.superlink]:
            stop(process, kill=True)


def ledger_rows(run: RunDirectory) -> list[dict]:
    return PrivacyLedger(run.root / "privacy").rows()


def rounds_of(run: RunDirectory) -> list[dict]:
    return [row for row in run.read_metrics() if "round" in row]


@pytest.mark.slow
def test_a_site_that_was_not_enrolled_is_refused(federation):
    rogue = create_node_keys(federation.root / "secrets" / "rogue", "site-rogue")
    process = federation.start_site("site-rogue", data_of="site-03", auth_key=rogue.private_key)
    process.wait(timeout=120)
    log = federation.log("site-rogue").read_text()
    assert JOINED not in log
    assert "No SuperNode found with the given public key" in log


@pytest.mark.slow
def test_plaintext_grpc_is_refused_when_tls_is_configured(federation):
    # The TLS listener closes a plaintext socket: the node never joins.
    process = federation.start_site("site-plain", data_of="site-01", plaintext=True)
    deadline = time.monotonic() + 120
    while "Connection attempt failed" not in federation.log("site-plain").read_text():
        assert time.monotonic() < deadline and process.poll() is None, "the plaintext site never tried to connect"
        time.sleep(0.5)
    stop(process, kill=True)
    assert JOINED not in federation.log("site-plain").read_text()


@pytest.fixture(scope="module")
def first_run(federation):
    config_path = deployment_config(federation.root, name="first", rounds=2)
    run, _ = federation.run(config_path)
    return run, config_path


@pytest.mark.slow
def test_a_two_round_dp_run_completes_with_every_site_and_the_simulation_layout(first_run):
    run, _ = first_run
    rounds = rounds_of(run)
    assert [row["round"] for row in rounds] == [1, 2]
    assert all(row["sites_trained"] == 3 and row["sites_failed"] == 0 for row in rounds)
    for relative in ("config.json", "metrics.jsonl", "model/last.pt", "privacy/ledger.jsonl", "privacy/report.json"):
        assert (run.root / relative).is_file(), relative


@pytest.mark.slow
def test_every_message_of_a_deployed_site_was_served_by_its_long_lived_worker(federation, first_run):
    for site_id in SITES:
        logs = "".join(log.read_text() for log in (federation.state_dir(site_id) / "workers").glob("*.log"))
        forwarded, handed_over = logs.count("message answered"), logs.count("task served in this process")
        # Both rounds' train messages; after the first, the SuperExec hands tasks straight to the
        # worker (no flwr-clientapp process).
        assert forwarded + handed_over >= 2 and handed_over >= 1, f"{site_id}: {forwarded} + {handed_over}"
        assert "running the ClientApp in this process" not in federation.log(site_id).read_text()
        # Its SuperExec launched them when its SuperNode rang, not at its next poll.
        assert "polling every 1 s or until its SuperNode rings" in federation.log(site_id).read_text()


@pytest.mark.slow
def test_the_ledger_equals_what_each_site_state_on_disk_says(federation, first_run):
    run, config_path = first_run
    last_epsilon = {row["site"]: row["epsilon"] for row in ledger_rows(run)}
    assert sorted(last_epsilon) == list(SITES)
    for site_id in SITES:
        assert last_epsilon[site_id] == pytest.approx(federation.spent_epsilon(site_id, config_path), rel=1e-9)
        assert last_epsilon[site_id] > 0


@pytest.mark.slow
def test_a_killed_site_is_recorded_and_a_restarted_site_keeps_its_spent_budget(federation, first_run):
    _, first_config = first_run
    spent_before = federation.spent_epsilon("site-01", first_config)
    stop(federation.sites["site-01"])
    federation.start_site("site-01")
    federation.wait_until_joined("site-01", joins=2)
    victim_log = federation.log("site-02")
    trains_before = victim_log.read_text().count("Receiving: train message")

    def kill_site_02_once_it_trains(run: RunDirectory, flwr_run_id: int) -> None:
        deadline = time.monotonic() + 300
        while victim_log.read_text().count("Receiving: train message") == trains_before:
            assert time.monotonic() < deadline, "site-02 never received the round"
            time.sleep(0.2)
        stop(federation.sites["site-02"], kill=True)

    config_path = deployment_config(federation.root, name="second", rounds=1)
    run, _ = federation.run(config_path, on_submit=kill_site_02_once_it_trains)

    status = {row["site"]: row["status"] for row in ledger_rows(run)}
    assert status["site-01"] == "refused"  # the restarted site remembers its budget is spent
    assert status["site-03"] == "trained"
    assert list(status.values()).count("failed") == 1  # site-02, known by node id only: it never replied
    assert rounds_of(run)[0]["sites_failed"] == 1 and rounds_of(run)[0]["sites_trained"] == 1
    assert federation.spent_epsilon("site-01", first_config) == pytest.approx(spent_before)


def train_messages(federation: LoopbackFederation, site_id: str) -> int:
    return federation.log(site_id).read_text().count("Receiving: train message")


@pytest.mark.slow
def test_secure_aggregation_runs_in_deployment_with_the_killed_site_rejoined(federation, first_run):
    _, first_config = first_run
    federation.start_site("site-02")  # killed by the test before: it rejoins the federation
    federation.wait_until_joined("site-02", joins=2)
    before = {site_id: train_messages(federation, site_id) for site_id in SITES}

    config_path = deployment_config(federation.root, name="secure", rounds=1, secure_aggregation=True)
    run, _ = federation.run(config_path)

    status = {row["site"]: row["status"] for row in ledger_rows(run)}
    assert status == {"site-01": "refused", "site-02": "trained", "site-03": "trained"}
    assert rounds_of(run)[0]["sites_trained"] == 2 and rounds_of(run)[0]["sites_failed"] == 0
    # SecAgg+ is four exchanges (keys, key shares, masked vectors, unmasking); each reaches every site.
    assert {site_id: train_messages(federation, site_id) - before[site_id] for site_id in SITES} == dict.fromkeys(SITES, 4)
    last_epsilon = {row["site"]: row["epsilon"] for row in ledger_rows(run)}
    for site_id in ("site-02", "site-03"):
        assert last_epsilon[site_id] == pytest.approx(federation.spent_epsilon(site_id, first_config), rel=1e-9)


@pytest.mark.slow
def test_a_run_resumes_after_the_aggregator_is_killed_and_restarted(federation, first_run):
    _, first_config = first_run
    killed: dict[str, int] = {}

    def kill_the_aggregator_after_round_one(run: RunDirectory, flwr_run_id: int) -> None:
        deadline = time.monotonic() + 600
        while not (run.model_dir / "last.pt").is_file():
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.2)
        killed["flwr_run_id"] = flwr_run_id
        stop(federation.superlink, kill=True)  # the SuperLink's process group: its ServerApp dies with it

    config_path = deployment_config(federation.root, name="resumed", rounds=2)
    with pytest.raises(DeploymentError, match="stopped answering"):
        federation.run(config_path, on_submit=kill_the_aggregator_after_round_one)
    [run_root] = (federation.root / "runs").glob("*-resumed-*")
    assert [row["round"] for row in rounds_of(RunDirectory(run_root))] == [1]

    # Same folder, same enrolments file: the sites keep their node ids and reconnect by themselves.
    enrolled = {node.node_id for node in read_enrolments(federation.deployment.folder / ENROLMENTS_FILE)}
    assert len(enrolled) == len(SITES)
    federation.superlink = start_superlink(federation.deployment, federation.tls)
    run, _ = federation.run(None, resume=run_root)
    assert {node.node_id for node in read_enrolments(federation.deployment.folder / ENROLMENTS_FILE)} == enrolled

    assert json.loads((run.root / "deployment.json").read_text())["flwr_run_id"] != killed["flwr_run_id"]
    rounds = rounds_of(run)
    assert [row["round"] for row in rounds] == [1, 2]
    assert rounds[1]["sites_trained"] == 2 and rounds[1]["sites_refused"] == 1
    assert torch.load(run.model_dir / "last.pt", map_location="cpu", weights_only=False)["round"] == 2
    # A site that trained in the killed round spent budget the aggregator never heard of; its
    # next ledger row still carries what it has spent in all, which is what its state says.
    last_epsilon = {row["site"]: row["epsilon"] for row in ledger_rows(run) if row["status"] == "trained"}
    for site_id in ("site-02", "site-03"):
        assert last_epsilon[site_id] == pytest.approx(federation.spent_epsilon(site_id, first_config), rel=1e-9)


@pytest.mark.slow
def test_a_site_started_with_its_own_smaller_budget_refuses_a_run_asking_more(federation, first_run):
    # The aggregator's run config asks epsilon 100 of site-03; its operator allows 2.
    joins = federation.log("site-03").read_text().count(JOINED)
    stop(federation.sites["site-03"])
    federation.start_site("site-03", budget_epsilon=2.0)
    federation.wait_until_joined("site-03", joins=joins + 1)

    run, _ = federation.run(deployment_config(federation.root, name="site-budget", rounds=1))

    rows = {row["site"]: row for row in ledger_rows(run)}
    assert rows["site-03"]["status"] == "refused"
    assert "asks a budget of epsilon 100, above the site's own 2" in rows["site-03"]["reason"]
    assert rows["site-02"]["status"] == "trained" and rows["site-02"]["budget_bound"] == "site"


@pytest.mark.slow
def test_federation_up_with_local_sites_then_federation_run_as_the_demo_does(tmp_path, capsys):
    """The two commands of ``make demo-federation``: ``federation up --local-sites`` makes the
    certificates and keys, starts a TLS SuperLink and enrols and starts a site process per site
    folder; ``federation run`` submits and waits; SIGTERM stops everything, exit status 0."""
    synthesize_dataset(tmp_path / "data", sites=3, per_site=16, size=64, seed=9, burned_in_text=0.0)
    config_path = deployment_config(tmp_path, name="demo-like", rounds=1)
    folder = tmp_path / "federation"
    ports = [str(free_port()) for _ in range(3)]
    up = spawn([sys.executable, "-m", "mammofl", "federation", "up", "--dir", str(folder), "--local-sites",
                str(config_path), "--fleet-port", ports[0], "--control-port", ports[1], "--serverappio-port", ports[2]],
               tmp_path / "up.log", env={**flower_environment(tmp_path / "flwr"), "PYTHONUNBUFFERED": "1"})
    try:
        assert main(["federation", "run", str(config_path), "--dir", str(folder), "--wait", "120",
                     "--timeout", "900"]) == 0
        run_root = Path(capsys.readouterr().out.split("run directory: ")[1].split()[0])
        assert [row["sites_trained"] for row in rounds_of(RunDirectory(run_root))] == [3]
        assert sorted(row["site"] for row in ledger_rows(RunDirectory(run_root))) == list(SITES)
        assert "TLS, SuperNode authentication on" in (tmp_path / "up.log").read_text()
        site_pids = [int(line.split("SuperNode pid ")[1].split(",")[0])
                     for line in (tmp_path / "up.log").read_text().splitlines() if "SuperNode pid" in line]
        assert len(site_pids) == 3

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        assert "stopping the SuperLink and 3 site process(es)" in (tmp_path / "up.log").read_text()
        for pid in site_pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        stop(up, kill=True)
