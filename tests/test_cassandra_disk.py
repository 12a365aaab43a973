"""On a real Cassandra node's disk -- SSTables and commit log -- there is only ciphertext, and after
``mammofl store purge`` a deleted image is in no SSTable and its key is unrecoverable everywhere.

Images carrying known marker strings and a known pixel pattern are stored, the node flushes its
memtables (nodetool over JMX), and every file under the node's data, commit-log and hints
directories is searched for those bytes. A plaintext control row written beside them must be
found, which shows that the flush happened and that the search would see a leak.
"""

from __future__ import annotations

import base64
import hashlib
import mmap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.crypto import Keyring, create_key
from api.store import CassandraImageStore, CassandraSettings
from mammofl.cli import main
from tests.cassandra_fixtures import SCRIPT, drop_keyspace_afterwards

pytest_plugins = ["tests.cassandra_fixtures"]

PIXEL_PATTERN = hashlib.sha256(b"mammofl disk test pixel pattern").digest() * 2
PIXEL_MARKER = b"BURNED-IN^PATIENT^NAME^7Q4"
ATTRIBUTE_MARKER = "ACCESSION-NUMBER-55X19Z"
CONTROL_MARKER = b"PLAINTEXT-CONTROL-ROW-9K2"


@pytest.fixture(scope="module")
def flushed_node(cassandra_node, cassandra_keyspace) -> dict[str, bytes]:
    """Stores the marked images and the control row, flushes, and returns the secrets to look for."""
    keyring = Keyring.generate()
    images = [PIXEL_MARKER + PIXEL_PATTERN * (size // len(PIXEL_PATTERN)) + PIXEL_MARKER
              for size in (200_000, 3_000_000)]
    with CassandraImageStore(CassandraSettings(keyspace=cassandra_keyspace), keyring) as store:
        stored = [store.put("site-disk", image, content_type="application/dicom",
                            attributes={"accession": ATTRIBUTE_MARKER, "patient": PIXEL_MARKER.decode()})
                  for image in images]
    _write_control_row(cassandra_node, cassandra_keyspace)
    cassandra_node.flush()
    secrets = {
        "pixel marker": PIXEL_MARKER,
        "pixel pattern": PIXEL_PATTERN,
        "attribute marker": ATTRIBUTE_MARKER.encode(),
        "key-encryption key": keyring.material(keyring.active_key_id),
    }
    for index, metadata in enumerate(stored):
        secrets[f"sha256 of image {index} (hex)"] = metadata.sha256.encode()
        secrets[f"sha256 of image {index} (raw)"] = bytes.fromhex(metadata.sha256)
    return secrets


def _write_control_row(topology, keyspace: str) -> None:
    cluster = topology.cluster()
    try:
        session = cluster.connect(keyspace)
        session.execute("CREATE TABLE plaintext_control (id int PRIMARY KEY, value blob) "
                        "WITH compression = {'enabled': 'false'}")
        session.execute("INSERT INTO plaintext_control (id, value) VALUES (1, %s)", (CONTROL_MARKER,))
    finally:
        cluster.shutdown()


def node_files(node_dir: Path) -> list[Path]:
    """Every non-empty file the node writes table data to: SSTables, commit log, hints."""
    return [path for folder in ("data", "commitlog", "hints") for path in (node_dir / folder).rglob("*")
            if path.is_file() and path.stat().st_size > 0]


def files_containing(paths: list[Path], needle: bytes) -> list[Path]:
    """The files that hold ``needle``, passing over any that vanished since they were listed
    (compaction's transaction logs and replaced SSTables of the system tables come and go)."""
    found = []
    for path in paths:
        try:
            with path.open("rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as content:
                if content.find(needle) != -1:
                    found.append(path)
        except FileNotFoundError:
            continue
    return found


def test_the_flush_wrote_sstables_for_both_store_tables(cassandra_node, cassandra_keyspace, flushed_node):
    table_dirs = (cassandra_node.node_dir(1) / "data" / cassandra_keyspace).iterdir()

    with_data = {path.name.split("-")[0] for path in table_dirs if any(path.glob("*-Data.db"))}

    assert {"images", "image_chunks", "plaintext_control"} <= with_data


def test_the_search_finds_plaintext_in_sstables_and_commit_log(cassandra_node, flushed_node):
    found = files_containing(node_files(cassandra_node.node_dir(1)), CONTROL_MARKER)

    assert any(path.name.endswith("-Data.db") and "plaintext_control" in str(path) for path in found)
    assert any(path.parent.name == "commitlog" for path in found)


def test_no_plaintext_marker_hash_or_key_is_on_disk(cassandra_node, flushed_node):
    files = node_files(cassandra_node.node_dir(1))
    assert any(path.parent.name == "commitlog" for path in files)

    leaks = {name: files_containing(files, secret) for name, secret in flushed_node.items()}

    assert {name: paths for name, paths in leaks.items() if paths} == {}


@pytest.fixture(scope="module")
def purge_keyspace(cassandra_node) -> Iterator[str]:
    """A keyspace of its own: a purge re-wraps and garbage-collects every image of the keyspace."""
    yield from drop_keyspace_afterwards(cassandra_node, f"mammofl_purge_{uuid.uuid4().hex[:10]}")


def test_after_store_purge_a_deleted_image_is_in_no_sstable_and_its_key_unrecoverable_everywhere(
        cassandra_node, purge_keyspace, tmp_path, monkeypatch):
    # Before: a DELETE left the wrapped data key and the ciphertext in SSTables (until compaction
    # after gc_grace_seconds) and in the commit log, while the key that unwraps it lived on.
    monkeypatch.setattr("mammofl.cli._wait_for_old_keys_last_users", lambda: None)
    keyring_path = tmp_path / "keyring.json"
    old_key = create_key(keyring_path)
    old_material = base64.b64encode(Keyring.from_file(keyring_path).material(old_key))
    settings = CassandraSettings(keyspace=purge_keyspace)
    kept_data, gone_data = PIXEL_PATTERN * 3000, PIXEL_MARKER * 8000
    with CassandraImageStore(settings, Keyring.from_file(keyring_path)) as store:
        kept = store.put("site-purge", kept_data).image_id
        gone = store.put("site-purge", gone_data).image_id
        wrapped = store.session.execute(f"SELECT wrapped_key FROM {purge_keyspace}.images WHERE site_id = %s AND "
                                        f"image_id = %s", ("site-purge", gone)).one().wrapped_key
        ciphertext = store.session.execute(f"SELECT ciphertext FROM {purge_keyspace}.image_chunks WHERE "
                                           f"image_id = %s AND chunk_index = 0", (gone,)).one().ciphertext[:256]
        cassandra_node.flush()
        keyspace_dir = cassandra_node.node_dir(1) / "data" / purge_keyspace

        def in_sstables(secret: bytes) -> list[Path]:
            return files_containing([path for path in keyspace_dir.rglob("*") if path.is_file()], secret)

        assert in_sstables(wrapped) and in_sstables(ciphertext)  # the search sees them while stored
        store.delete("site-purge", gone)

    nodetool = f"bash {SCRIPT} nodetool 1"
    assert main(["store", "purge", "--cassandra", f"127.0.0.1:{cassandra_node.port}", "--keyspace", purge_keyspace,
                 "--keyring", str(keyring_path), "--nodetool", nodetool]) == 0

    assert in_sstables(wrapped) == [] and in_sstables(ciphertext) == []
    # The commit log keeps what was written until its segment is recycled: wrapped by a key that is gone.
    elsewhere = files_containing(node_files(cassandra_node.node_dir(1)), wrapped)
    assert all(path.parent.name in ("commitlog", "hints") for path in elsewhere), elsewhere
    keyring = Keyring.from_file(keyring_path)
    assert old_key not in keyring.key_ids and old_material not in keyring_path.read_bytes()
    with CassandraImageStore(settings, keyring) as store:
        assert store.get("site-purge", kept).data == kept_data
        assert not store.exists("site-purge", gone)
