"""Three nodes, replication 3, QUORUM: a node killed mid-traffic loses nothing that was written.

While writers store images and a reader re-reads earlier ones, one node gets SIGKILL (through its
own pid file). Every put that returned must read back intact; a put that failed must have left
nothing readable; reads must go on throughout.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from api.crypto import Keyring
from api.store import CassandraImageStore, CassandraSettings, StoreError

pytest_plugins = ["tests.cassandra_fixtures"]
pytestmark = pytest.mark.cassandra_cluster

VICTIM = 3
WRITERS = 2
SECONDS_BEFORE_KILL = 4.0
SECONDS_AFTER_KILL = 10.0


@pytest.fixture(scope="module")
def cluster_store(cassandra_cluster, cluster_keyspace):
    settings = CassandraSettings(contact_points=cassandra_cluster.addresses, port=cassandra_cluster.port,
                                 keyspace=cluster_keyspace, datacenters={"datacenter1": 3},
                                 consistency="QUORUM", serial_consistency="SERIAL", request_timeout_s=20)
    with CassandraImageStore(settings, Keyring.generate()) as store:
        yield store


@pytest.fixture
def victim(cassandra_cluster):
    """The node to kill; brought back afterwards when the cluster outlives this session."""
    yield VICTIM
    if not cassandra_cluster.started_here:
        cassandra_cluster.up()


class Traffic:
    """Writers putting fresh images and a reader re-reading earlier ones, until stopped."""

    def __init__(self, store: CassandraImageStore, site: str, earlier: dict[uuid.UUID, bytes]) -> None:
        self.store, self.site, self.earlier = store, site, earlier
        self.written: dict[uuid.UUID, tuple[bytes, float]] = {}
        self.failed_puts: list[StoreError] = []
        self.reads = 0
        self.read_errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._write) for _ in range(WRITERS)]
        self._threads.append(threading.Thread(target=self._read))

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _write(self) -> None:
        while not self._stop.is_set():
            data = os.urandom(1_500_000 + int.from_bytes(os.urandom(2), "big") * 8)
            try:
                image_id = self.store.put(self.site, data).image_id
            except StoreError as error:
                with self._lock:
                    self.failed_puts.append(error)
                continue
            with self._lock:
                self.written[image_id] = (data, time.monotonic())

    def _read(self) -> None:
        while not self._stop.is_set():
            for image_id, data in self.earlier.items():
                try:
                    intact = self.store.get(self.site, image_id).data == data
                except StoreError as error:
                    self.read_errors.append(error)
                    continue
                if not intact:
                    self.read_errors.append(AssertionError(f"image {image_id} read back different"))
                self.reads += 1


def test_every_image_written_while_a_node_is_killed_reads_back_intact(cassandra_cluster, cluster_store, victim):
    site = f"site-{uuid.uuid4().hex[:10]}"
    earlier = {}
    for _ in range(3):
        data = os.urandom(1_000_000)
        earlier[cluster_store.put(site, data).image_id] = data

    with Traffic(cluster_store, site, earlier) as traffic:
        time.sleep(SECONDS_BEFORE_KILL)
        cassandra_cluster.kill(victim)
        killed_at = time.monotonic()
        time.sleep(SECONDS_AFTER_KILL)

    assert traffic.read_errors == [] and traffic.reads > 0
    assert any(when > killed_at for _, when in traffic.written.values()), "no put completed after the kill"
    for image_id, (data, _) in traffic.written.items():
        assert cluster_store.get(site, image_id).data == data
    listed = {image.image_id for image in cluster_store.list_site(site, page_size=1000).images}
    assert listed == set(earlier) | set(traffic.written), "a failed put left a readable image behind"
    assert traffic.failed_puts == []
