"""The aggregator of a deployed federation: a Flower SuperLink, and runs submitted to it.

Flower does the distributed work. ``flower-superlink`` serves the Fleet API to the sites'
SuperNodes and the Control API to whoever submits runs; it launches our ServerApp for each
run. This module starts it with TLS and SuperNode authentication, enrols sites' public keys,
and submits a run as ``flwr run`` does (a FAB of our app plus run config over the Control
API), naming the run directory so that the ServerApp writes the same ``runs/<id>/`` layout
as a simulation, and so that a resubmitted run resumes from its last global model.

A deployment folder holds what its parties need: ``deployment.json`` (addresses, TLS files,
whether authentication is on), the SuperLink's database and logs. ``mammofl federation up``
writes it, ``mammofl federation run`` reads it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from clients.flower_processes import flower_environment
from common.certs import TlsFiles
from common.config import ExperimentConfig, load_config, parse_config
from common.errors import ConfigError, MammoflError
from common.runs import RunDirectory

DEPLOYMENT_FILE = "deployment.json"
ENROLMENTS_FILE = "enrolments.json"  # the SuperLink's enrolled sites (`server.superlink_state`)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What a run's FAB carries: the rooms the ServerApp and ClientApp import, nothing else.
APP_ROOMS = ("common", "clients", "server", "anonymize")


class DeploymentError(MammoflError):
    """A SuperLink, a site process or a submitted run did not do what was asked."""


@dataclass(frozen=True)
class Deployment:
    """How to reach one SuperLink: written by ``federation up``, read by every other command."""

    folder: Path
    fleet_address: str
    control_address: str
    serverappio_address: str
    ca_certificate: Path | None
    node_auth: bool

    @property
    def insecure(self) -> bool:
        return self.ca_certificate is None

    def save(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / DEPLOYMENT_FILE
        payload = {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(self).items()}
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path, *, wait: float = 0.0) -> "Deployment":
        """The deployment in `folder`, waiting up to `wait` seconds for its SuperLink to be up."""
        path = folder / DEPLOYMENT_FILE
        deadline = time.monotonic() + wait
        while not path.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        if not path.is_file():
            raise ConfigError(f"{path}: no deployment here; start one with `mammofl federation up --dir {folder}`")
        raw = json.loads(path.read_text())
        ca = raw["ca_certificate"]
        return cls(folder=folder, fleet_address=raw["fleet_address"], control_address=raw["control_address"],
                   serverappio_address=raw["serverappio_address"], ca_certificate=Path(ca) if ca else None,
                   node_auth=bool(raw["node_auth"]))

    def write_flower_config(self, connection: str = "mammofl") -> Path:
        """A Flower configuration (``FLWR_HOME=<folder>/flwr``) naming this SuperLink, for the ``flwr`` CLI."""
        lines = ["[superlink]", f'default = "{connection}"', "", f"[superlink.{connection}]",
                 f'address = "{self.control_address}"']
        lines.append("insecure = true" if self.insecure else f'root-certificates = "{self.ca_certificate}"')
        path = self.folder / "flwr" / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path


def superlink_command(deployment: Deployment, tls: TlsFiles | None) -> list[str]:
    """The ``flower-superlink`` command line: TLS unless none is given, runtime installs off.

    Flower's SuperLink with runs, messages and objects in memory and its enrolments in
    ``DIR/enrolments.json`` (`server.superlink_state`); a deployment that kept its state in
    ``DIR/superlink.db`` (before 2026-12-08) has its enrolments imported from there once.
    """
    command = [sys.executable, "-m", "server.superlink_state",
               "--enrolments", str(deployment.folder / ENROLMENTS_FILE),
               "--import-from", str(deployment.folder / "superlink.db"),
               "--fleet-api-address", deployment.fleet_address,
               "--control-api-address", deployment.control_address,
               "--serverappio-api-address", deployment.serverappio_address,
               # Our ServerApp runs in this environment; nothing is installed while a run starts.
               "--disable-runtime-dependency-installation"]
    if tls is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(tls.ca_certificate), "--ssl-certfile", str(tls.server_certificate),
                    "--ssl-keyfile", str(tls.server_key)]
    if deployment.node_auth:
        command.append("--enable-supernode-auth")
    return command


def start_superlink(deployment: Deployment, tls: TlsFiles | None, *, timeout: float = 60.0) -> subprocess.Popen:
    """Start the SuperLink in its own process group and wait until it listens.

    ``deployment.json`` is written only then, so that its presence means "ready".
    """
    (deployment.folder / DEPLOYMENT_FILE).unlink(missing_ok=True)
    deployment.folder.mkdir(parents=True, exist_ok=True)
    process = spawn(superlink_command(deployment, tls), deployment.folder / "superlink.log",
                    env=flower_environment(deployment.folder / "flwr"))
    wait_until_listening(deployment.control_address, process, timeout=timeout)
    wait_until_listening(deployment.fleet_address, process, timeout=timeout)
    deployment.save()
    return process


def spawn(command: list[str], log_path: Path, *, env: dict[str, str]) -> subprocess.Popen:
    """A long-lived child in its own process group (it spawns children of its own), logging to a file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def stop(process: subprocess.Popen, *, kill: bool = False, timeout: float = 20.0, grace: float = 3.0) -> None:
    """Stop a process started by `spawn` and every process of its group (SuperExec, App processes).

    The whole group is signalled, even when its leader has already exited. Whatever of the
    group is still alive `grace` seconds after the leader is gone is killed: a Flower App
    process can hang for good at exit, flushing its logs to a SuperLink that has stopped.
    """
    _signal_group(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    _wait_for_group(process.pid, grace)
    _signal_group(process.pid, signal.SIGKILL)
    _wait_for_group(process.pid, timeout)  # SIGKILL lands asynchronously


def _wait_for_group(pgid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _group_is_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _group_is_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, which only wait to be reaped, do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def wait_until_listening(address: str, process: subprocess.Popen, *, timeout: float) -> None:
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"{Path(process.args[0]).name} exited with status {process.returncode} "
                                  f"before listening on {address}; see its log")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"nothing listens on {address} after {timeout:.0f} s")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextmanager
def control_stub(deployment: Deployment) -> Iterator[Any]:
    """A stub of the SuperLink's Control API over the deployment's TLS channel (as the ``flwr`` CLI opens it)."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_channel_from_connection
    from flwr.proto.control_pb2_grpc import ControlStub

    connection = SuperLinkConnection(
        name="mammofl", address=deployment.control_address, insecure=deployment.insecure,
        root_certificates=None if deployment.insecure else str(deployment.ca_certificate),
    )
    channel = init_channel_from_connection(connection)
    try:
        yield ControlStub(channel)
    finally:
        channel.close()


def enrol_site(deployment: Deployment, public_key: Path) -> int | None:
    """Register a site's public key with the SuperLink (``flwr supernode register``).

    Returns the site's node id, or None when the key is already enrolled: a restarted
    SuperLink keeps its enrolments (`DIR/enrolments.json`, `server.superlink_state`).
    """
    import grpc
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.proto.control_pb2 import RegisterNodeRequest

    with control_stub(deployment) as stub:
        try:
            response = stub.RegisterNode(RegisterNodeRequest(public_key=try_load_public_key(public_key)))
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION and "already" in (error.details() or ""):
                return None
            raise DeploymentError(f"the SuperLink refused to enrol {public_key}: {error.details()}") from error
    return int(response.node_id)


def prepare_run_directory(config_path: Path | None, *, resume: Path | None) -> RunDirectory:
    """The run directory a deployed run writes, holding the config every party reads.

    Relative paths in the config are made absolute here: the ServerApp and ClientApps run
    in other processes with other working directories.
    """
    if resume is not None:
        if not (resume / "config.json").is_file():
            raise ConfigError(f"--resume {resume}: not a run directory (no config.json)")
        return RunDirectory(resume.resolve())
    config = _with_absolute_paths(load_config(config_path))
    if config.model.pretrained is not None:
        from common.models.transfer import require_site_free_weights  # torch: only when weights are named

        require_site_free_weights(config.model.pretrained)
    run = RunDirectory.create(config.tracking.runs_dir, config.name)
    run.write_config(config)
    return run


def _with_absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    def absolute(value: Any) -> Any:
        if isinstance(value, Path):
            return value.resolve()
        if isinstance(value, dict):
            return {key: absolute(item) for key, item in value.items()}
        if isinstance(value, list):
            return [absolute(item) for item in value]
        return value

    return parse_config(absolute(config.model_dump()))


def build_app_bundle() -> bytes:
    """Our Flower App as a FAB (Flower's builder, fed only the rooms the apps import)."""
    from flwr.cli.build import build_fab_from_files

    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise DeploymentError(f"{PROJECT_ROOT}: no pyproject.toml; federation run needs the project source tree")
    files: dict[str, Path] = {"pyproject.toml": PROJECT_ROOT / "pyproject.toml", ".gitignore": PROJECT_ROOT / ".gitignore"}
    for room in APP_ROOMS:
        for path in (PROJECT_ROOT / room).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files[path.relative_to(PROJECT_ROOT).as_posix()] = path
    return build_fab_from_files(files)[0]


def submit_run(stub, run: RunDirectory) -> int:
    """Start our app on the SuperLink for `run` (what ``flwr run`` does); returns Flower's run id."""
    import hashlib

    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab_bytes = build_app_bundle()
    # The config travels with the run: a site on another machine has no copy of run.root.
    run_config = {"config-json": (run.root / "config.json").read_text(), "config-path": str(run.root / "config.json"),
                  "run-dir": str(run.root)}
    request = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})),
                              override_config=user_config_to_proto(run_config))
    response = stub.StartRun(request)
    if not response.HasField("run_id"):
        raise DeploymentError(f"the SuperLink refused to start the run of {run.root}")
    return int(response.run_id)


@dataclass(frozen=True)
class RunStatus:
    status: str
    sub_status: str
    details: str

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def completed(self) -> bool:
        return self.finished and self.sub_status == "completed"


def run_status(stub, flwr_run_id: int) -> RunStatus:
    from flwr.proto.control_pb2 import ListRunsRequest

    status = stub.ListRuns(ListRunsRequest(run_id=flwr_run_id)).run_dict[flwr_run_id].status
    return RunStatus(status.status, status.sub_status, status.details)


def wait_for_run(stub, flwr_run_id: int, *, timeout: float, poll: float = 1.0) -> RunStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(stub, flwr_run_id)
        if status.finished:
            return status
        if time.monotonic() > deadline:
            raise DeploymentError(f"run {flwr_run_id} still {status.status} after {timeout:.0f} s")
        time.sleep(poll)


def run_federation(deployment: Deployment, config_path: Path | None, *, resume: Path | None = None,
                   timeout: float = 3600.0, on_submit=None) -> tuple[RunDirectory, RunStatus]:
    """``mammofl federation run``: submit the config (or resume a run directory) and wait for the end.

    `on_submit` is called with the run directory and Flower's run id once the SuperLink accepted the run.
    """
    if (config_path is None) == (resume is None):
        raise ConfigError("federation run needs a CONFIG, or --resume RUN_DIR (which carries its own config)")
    run = prepare_run_directory(config_path, resume=resume)
    with control_stub(deployment) as stub:
        flwr_run_id = submit_run(stub, run)
        (run.root / "deployment.json").write_text(json.dumps(
            {"flwr_run_id": flwr_run_id, "superlink": deployment.control_address}) + "\n")
        if on_submit is not None:
            on_submit(run, flwr_run_id)
        try:
            status = wait_for_run(stub, flwr_run_id, timeout=timeout)
        except grpc.RpcError as exc:
            raise DeploymentError(
                f"the SuperLink at {deployment.control_address} stopped answering while run {flwr_run_id} was "
                f"going ({exc.code().name}); see {deployment.folder / 'superlink.log'}") from None
    if not status.completed:
        raise DeploymentError(f"run {flwr_run_id} ended {status.status}:{status.sub_status} ({status.details}); "
                              f"see {deployment.folder / 'superlink.log'} and `flwr log {flwr_run_id}`")
    return run, status
