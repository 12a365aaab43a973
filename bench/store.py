"""Encrypted image store throughput (MB/s) against raw driver writes of the same bytes.

In one run, on the single Cassandra node (started with scripts/cassandra/cassandra.sh when
127.0.0.1:9042 does not answer, and stopped again afterwards):

- raw: the image's plaintext in chunks of the same size, written and read through the driver
  with the same concurrency and the same kind of table -- the limit the store can reach;
- store: ``CassandraImageStore.put`` / ``get`` (sha256, encryption, key wrap, chunks, record);
- encrypt / decrypt: the cryptography alone, in memory;
- sqlite: the embedded store, for reference.

Each round runs every measurement once, so that load from elsewhere on the machine hits them
alike; the median over rounds is printed, with store/raw ratios (the aim is at least 0.70).

    .venv/bin/python bench/store.py [--size-mb 40] [--rounds 3] [--chunk-kib 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cassandra.cluster import Cluster, NoHostAvailable, Session

from api.crypto import ImageCipher, Keyring
from api.store import CassandraImageStore, CassandraSettings, SQLiteImageStore
from api.store.cassandra import execute_concurrently

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "cassandra" / "cassandra.sh"
KEYSPACE = "mammofl_bench"
SITE = "bench-site"
MEASUREMENTS = ("raw put", "store put", "raw get", "store get", "encrypt", "decrypt", "sqlite put", "sqlite get")
T = TypeVar("T")


def timed(seconds: list[float], action: Callable[[], T]) -> T:
    """Runs the action, appends its duration to ``seconds``, returns its result."""
    started = time.perf_counter()
    result = action()
    seconds.append(time.perf_counter() - started)
    return result


class RawChunks:
    """The plaintext written and read as the store would, minus everything the store adds."""

    def __init__(self, session: Session, chunk_size: int, concurrency: int) -> None:
        session.execute(f"CREATE TABLE IF NOT EXISTS {KEYSPACE}.raw_chunks (image_id uuid, chunk_index int, "
                        f"data blob, PRIMARY KEY ((image_id, chunk_index))) WITH compression = {{'enabled': 'false'}}")
        self._insert = session.prepare(f"INSERT INTO {KEYSPACE}.raw_chunks (image_id, chunk_index, data) VALUES (?, ?, ?)")
        self._select = session.prepare(f"SELECT data FROM {KEYSPACE}.raw_chunks WHERE image_id = ? AND chunk_index = ?")
        self._session, self._chunk_size, self._concurrency = session, chunk_size, concurrency

    def put(self, data: bytes) -> tuple[uuid.UUID, int]:
        image_id, view = uuid.uuid4(), memoryview(data)
        chunks = ((image_id, index, view[start:start + self._chunk_size])
                  for index, start in enumerate(range(0, len(data), self._chunk_size)))
        for _ in execute_concurrently(self._session, self._insert, chunks, self._concurrency):
            pass
        return image_id, -(-len(data) // self._chunk_size)

    def get(self, image_id: uuid.UUID, count: int) -> bytes:
        keys = ((image_id, index) for index in range(count))
        return b"".join(result.one().data for result in
                        execute_concurrently(self._session, self._select, keys, self._concurrency))


class CryptoOnly:
    """The store's cryptographic work on one image, in memory: no database."""

    def __init__(self, data: bytes, keyring: Keyring, chunk_size: int) -> None:
        self._data, self._keyring, self._chunk_size = data, keyring, chunk_size
        self._count = -(-len(data) // chunk_size)
        self._cipher = ImageCipher.generate(image_id=uuid.uuid4(), site_id=SITE)

    def encrypt(self) -> list[bytes]:
        """sha256 of the plaintext, the key wrap, every chunk encrypted."""
        hashlib.sha256(self._data).hexdigest()
        self._cipher.wrap(self._keyring)
        view, size = memoryview(self._data), self._chunk_size
        return [self._cipher.encrypt_chunk(view[i * size:(i + 1) * size], index=i, count=self._count)
                for i in range(self._count)]

    def decrypt(self, chunks: list[bytes]) -> str:
        """Every chunk decrypted, and the sha256 that verifies them."""
        digest = hashlib.sha256()
        for index, chunk in enumerate(chunks):
            digest.update(self._cipher.decrypt_chunk(chunk, index=index, count=self._count))
        return digest.hexdigest()


def measure(args: argparse.Namespace) -> dict[str, float]:
    """MB/s of each measurement, median over the rounds."""
    chunk_size = args.chunk_kib * 1024
    data = os.urandom(int(args.size_mb * 1024 * 1024))
    keyring = Keyring.generate()
    settings = CassandraSettings(keyspace=KEYSPACE, consistency="ONE", concurrency=args.concurrency,
                                 protocol_version=args.protocol_version)
    seconds: dict[str, list[float]] = {name: [] for name in MEASUREMENTS}
    cluster = Cluster(["127.0.0.1"], protocol_version=args.protocol_version, compression=False)
    try:
        with CassandraImageStore(settings, keyring, chunk_size=chunk_size) as store, \
                tempfile.TemporaryDirectory() as folder, \
                SQLiteImageStore(Path(folder) / "bench.db", keyring, chunk_size=chunk_size) as sqlite:
            raw = RawChunks(cluster.connect(), chunk_size, args.concurrency)
            crypto = CryptoOnly(data, keyring, chunk_size)
            for _ in range(args.rounds):
                raw_id, raw_count = timed(seconds["raw put"], lambda: raw.put(data))
                stored = timed(seconds["store put"], lambda: store.put(SITE, data))
                if timed(seconds["raw get"], lambda: raw.get(raw_id, raw_count)) != data:
                    raise AssertionError("the raw chunks read back differ from those written")
                timed(seconds["store get"], lambda: store.get(SITE, stored.image_id))
                chunks = timed(seconds["encrypt"], crypto.encrypt)
                timed(seconds["decrypt"], lambda: crypto.decrypt(chunks))
                in_sqlite = timed(seconds["sqlite put"], lambda: sqlite.put(SITE, data))
                timed(seconds["sqlite get"], lambda: sqlite.get(SITE, in_sqlite.image_id))
    finally:
        cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {KEYSPACE}", timeout=120)
        cluster.shutdown()
    return {name: args.size_mb / statistics.median(values) for name, values in seconds.items()}


def report(args: argparse.Namespace, rates: dict[str, float]) -> None:
    print(f"image {args.size_mb:g} MB, chunks {args.chunk_kib} KiB, concurrency {args.concurrency}, "
          f"protocol v{args.protocol_version}, median of {args.rounds} rounds")
    print("measurement |     MB/s")
    for name, rate in rates.items():
        print(f"{name:<11} | {rate:8.1f}")
    for operation in ("put", "get"):
        ratio = rates[f"store {operation}"] / rates[f"raw {operation}"]
        print(f"store/raw {operation}: {ratio:.2f} ({'meets' if ratio >= 0.70 else 'misses'} the 0.70 aim)")


def node_answers() -> bool:
    cluster = Cluster(["127.0.0.1"], protocol_version=4, connect_timeout=3)
    try:
        cluster.connect()
    except NoHostAvailable:
        return False
    finally:
        cluster.shutdown()
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-kib", type=int, default=1024, choices=[256, 512, 1024])
    parser.add_argument("--concurrency", type=int, default=CassandraSettings().concurrency)
    parser.add_argument("--protocol-version", type=int, default=CassandraSettings().protocol_version)
    args = parser.parse_args()
    started_here = not node_answers()
    if started_here:
        subprocess.run(["bash", str(SCRIPT), "up"], check=True, stdout=sys.stderr)
    try:
        report(args, measure(args))
    finally:
        if started_here:
            subprocess.run(["bash", str(SCRIPT), "down", "--nodes", "1"], check=True, stdout=sys.stderr)


if __name__ == "__main__":
    main()
