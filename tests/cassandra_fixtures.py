"""Real Cassandra nodes for the tests, run by scripts/cassandra/cassandra.sh.

Load as a plugin (``pytest_plugins = ["tests.cassandra_fixtures"]``) so that each session-scoped
fixture exists once per run. A topology that already answers CQL (``make test`` starts the single
node before pytest) is used as it is and left running; one that this session starts, it stops.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cassandra.cluster import Cluster

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "cassandra" / "cassandra.sh"
START_TIMEOUT_S = 420
CQL_OPTIONS_REQUEST = bytes([0x04, 0, 0, 1, 0x05, 0, 0, 0, 0])  # protocol v4, stream 1, OPTIONS
CQL_SUPPORTED_OPCODE = 0x06


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cassandra_cluster: needs the three-node Cassandra cluster (fault tests)")


def run_script(*arguments: str, timeout: float = START_TIMEOUT_S) -> str:
    """Runs cassandra.sh; on failure raises with its output, which ends with the node's log tail."""
    result = subprocess.run(["bash", str(SCRIPT), *arguments], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"cassandra.sh {' '.join(arguments)} failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result.stdout


def cql_answers(address: str, port: int) -> bool:
    """True when a CQL server at address:port answers an OPTIONS request with SUPPORTED."""
    try:
        with socket.create_connection((address, port), timeout=3) as connection:
            connection.sendall(CQL_OPTIONS_REQUEST)
            header = connection.recv(9)
    except OSError:
        return False
    return len(header) >= 5 and header[4] == CQL_SUPPORTED_OPCODE


@dataclass(frozen=True)
class Topology:
    """One of cassandra.sh's topologies: the single node (1) or the cluster (3)."""

    nodes: int
    port: int
    started_here: bool = False

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(f"127.0.0.{index}" for index in range(1, self.nodes + 1))

    def answers(self) -> bool:
        return all(cql_answers(address, self.port) for address in self.addresses)

    def up(self) -> None:
        run_script("up", "--nodes", str(self.nodes))

    def down(self) -> None:
        run_script("down", "--nodes", str(self.nodes), timeout=180)

    def flush(self) -> None:
        run_script("flush", "--nodes", str(self.nodes), timeout=180)

    def node_dir(self, node: int) -> Path:
        return Path(run_script("dir", "--nodes", str(self.nodes), str(node)).strip())

    def pid(self, node: int) -> int:
        """The node's pid, from cassandra.sh's pid file (never looked up by process name)."""
        pid_file = self.node_dir(node) / "cassandra.pid"
        if not pid_file.exists():
            raise RuntimeError(f"{pid_file} is absent: node {node} was not started by cassandra.sh")
        return int(pid_file.read_text())

    def kill(self, node: int) -> None:
        os.kill(self.pid(node), signal.SIGKILL)

    def cluster(self) -> Cluster:
        return Cluster(list(self.addresses), port=self.port, protocol_version=4)


def _running(topology: Topology) -> Iterator[Topology]:
    if topology.answers():
        yield topology
        return
    topology.up()
    try:
        yield replace(topology, started_here=True)
    finally:
        topology.down()


@pytest.fixture(scope="session")
def cassandra_node() -> Iterator[Topology]:
    """The single node on 127.0.0.1:9042."""
    yield from _running(Topology(nodes=1, port=9042))


@pytest.fixture(scope="session")
def cassandra_cluster() -> Iterator[Topology]:
    """The three-node cluster on 127.0.0.1-3, port 9142."""
    yield from _running(Topology(nodes=3, port=9142))


def drop_keyspace_afterwards(topology: Topology, keyspace: str) -> Iterator[str]:
    """Yields the keyspace name, then drops the keyspace (and so its files) if it was created."""
    yield keyspace
    cluster = topology.cluster()
    try:
        cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def cassandra_keyspace(cassandra_node: Topology) -> Iterator[str]:
    """A keyspace name of this session's own on the single node."""
    yield from drop_keyspace_afterwards(cassandra_node, f"mammofl_test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def cluster_keyspace(cassandra_cluster: Topology) -> Iterator[str]:
    """A keyspace name of this session's own on the three-node cluster."""
    yield from drop_keyspace_afterwards(cassandra_cluster, f"mammofl_test_{uuid.uuid4().hex[:12]}")
