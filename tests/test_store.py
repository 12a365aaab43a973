"""The image store's contract, one suite run against both backends: SQLite and a real Cassandra.

Tampering goes straight to the database (``SQLiteRaw``, ``CassandraRaw``), as a disk fault or an
attacker with database access would, never through the store.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cassandra.cluster import Cluster

from api.crypto import ImageCipher, Keyring, create_key, retire_key, rotate_key
from api.store import (
    CassandraImageStore,
    CassandraSettings,
    ImageNotFoundError,
    ImageStore,
    IntegrityError,
    InvalidRequestError,
    KeyspaceMissingError,
    MissingChunkError,
    PartialWriteError,
    SQLiteImageStore,
    StoreUnavailableError,
    WrongKeyError,
)

pytest_plugins = ["tests.cassandra_fixtures"]

CHUNK = 256 * 1024
MARKER = b"PATIENT^MARKER^e1f0c3"
PIXEL_PATTERN = bytes(range(0x40, 0x80)) * 4


class SQLiteRaw:
    """Direct access to the rows SQLiteImageStore wrote, bypassing the store."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection = sqlite3.connect(path, isolation_level=None)

    def chunk(self, image_id, index):
        return self._connection.execute("SELECT ciphertext FROM image_chunks WHERE image_id = ? AND chunk_index = ?",
                                        (image_id.bytes, index)).fetchone()[0]

    def set_chunk(self, image_id, index, ciphertext):
        self._connection.execute("UPDATE image_chunks SET ciphertext = ? WHERE image_id = ? AND chunk_index = ?",
                                 (ciphertext, image_id.bytes, index))

    def delete_chunk(self, image_id, index):
        self._connection.execute("DELETE FROM image_chunks WHERE image_id = ? AND chunk_index = ?",
                                 (image_id.bytes, index))

    def present_chunks(self, image_id, up_to):
        rows = self._connection.execute("SELECT chunk_index FROM image_chunks WHERE image_id = ? ORDER BY chunk_index",
                                        (image_id.bytes,))
        return [index for (index,) in rows if index < up_to]

    def every_stored_value(self):
        for table in ("images", "image_chunks"):
            for row in self._connection.execute(f"SELECT * FROM {table}"):
                yield from (_as_bytes(value) for value in row)
        for file in self.path.parent.glob(self.path.name + "*"):
            yield file.read_bytes()


class CassandraRaw:
    """Direct access to the rows CassandraImageStore wrote, bypassing the store."""

    def __init__(self, cluster: Cluster, keyspace: str) -> None:
        self._session = cluster.connect(keyspace)

    def chunk(self, image_id, index):
        return self._session.execute("SELECT ciphertext FROM image_chunks WHERE image_id = %s AND chunk_index = %s",
                                     (image_id, index)).one().ciphertext

    def set_chunk(self, image_id, index, ciphertext):
        self._session.execute("UPDATE image_chunks SET ciphertext = %s WHERE image_id = %s AND chunk_index = %s",
                              (ciphertext, image_id, index))

    def delete_chunk(self, image_id, index):
        self._session.execute("DELETE FROM image_chunks WHERE image_id = %s AND chunk_index = %s", (image_id, index))

    def present_chunks(self, image_id, up_to):
        return [index for index in range(up_to) if self._session.execute(
            "SELECT chunk_index FROM image_chunks WHERE image_id = %s AND chunk_index = %s", (image_id, index)).one()]

    def every_stored_value(self):
        for table in ("images", "image_chunks"):
            for row in self._session.execute(f"SELECT * FROM {table}"):
                yield from (_as_bytes(value) for value in row)


def _as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


class Backend:
    """One backend under test: a store with the session's keyring, more on request, raw access."""

    def __init__(self, name: str, store: ImageStore, raw: SQLiteRaw | CassandraRaw,
                 open_store: Callable[[Keyring], ImageStore]) -> None:
        self.name, self.store, self.raw, self._open_store = name, store, raw, open_store
        self._opened: list[ImageStore] = []

    def open(self, keyring: Keyring) -> ImageStore:
        store = self._open_store(keyring)
        self._opened.append(store)
        return store

    def close(self) -> None:
        for store in self._opened:
            store.close()


@pytest.fixture(scope="session")
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture(scope="session")
def cassandra_backend(cassandra_node, cassandra_keyspace, keyring) -> Iterator[Backend]:
    settings = CassandraSettings(keyspace=cassandra_keyspace, consistency="ONE")
    store = CassandraImageStore(settings, keyring, chunk_size=CHUNK)
    cluster = cassandra_node.cluster()
    backend = Backend("cassandra", store, CassandraRaw(cluster, cassandra_keyspace),
                      lambda other_keyring: CassandraImageStore(settings, other_keyring, chunk_size=CHUNK))
    yield backend
    backend.close()
    store.close()
    cluster.shutdown()


@pytest.fixture(params=["sqlite", "cassandra"])
def backend(request, tmp_path, keyring) -> Iterator[Backend]:
    if request.param == "cassandra":
        yield request.getfixturevalue("cassandra_backend")
        return
    path = tmp_path / "images.db"
    with SQLiteImageStore(path, keyring, chunk_size=CHUNK) as store:
        backend = Backend("sqlite", store, SQLiteRaw(path),
                          lambda other_keyring: SQLiteImageStore(path, other_keyring, chunk_size=CHUNK))
        yield backend
        backend.close()


@pytest.fixture
def store(backend) -> ImageStore:
    return backend.store


@pytest.fixture
def site() -> str:
    """A site of the test's own, so that tests sharing a keyspace never see each other's images."""
    return f"site-{uuid.uuid4().hex[:10]}"


def mammogram(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes with a recognisable pixel pattern, the size of the caller's choosing."""
    pattern = PIXEL_PATTERN + seed.to_bytes(4, "big")
    return (pattern * (size // len(pattern) + 1))[:size]


def test_a_small_image_round_trips_with_its_metadata(store, site):
    data = mammogram(5000)

    stored = store.put(site, data, content_type="application/dicom", attributes={"rows": 64, "removed_tags": 12})
    read = store.get(site, stored.image_id)

    assert read.data == data
    assert read.metadata == stored == store.metadata(site, stored.image_id)
    assert stored.size == 5000 and stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.attributes == {"rows": 64, "removed_tags": 12} and stored.content_type == "application/dicom"
    assert store.exists(site, stored.image_id)


def test_a_large_image_round_trips_in_chunks(store, site):
    data = os.urandom(48 * 1024 * 1024 + 12345)

    stored = store.put(site, data)

    assert stored.chunk_count > 48
    assert store.get(site, stored.image_id).data == data


def test_concurrent_writers_read_back_their_own_images(store, site):
    written: dict[uuid.UUID, bytes] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def writer(worker: int) -> None:
        try:
            for round_ in range(3):
                data = mammogram(300_000 + 70_000 * worker + round_, seed=worker * 10 + round_)
                image_id = store.put(site, data).image_id
                with lock:
                    written[image_id] = data
        except BaseException as error:  # collected, then asserted empty below
            failures.append(error)

    threads = [threading.Thread(target=writer, args=(worker,)) for worker in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    assert len(written) == 18
    for image_id, data in written.items():
        assert store.get(site, image_id).data == data
    assert {image.image_id for image in store.list_site(site, page_size=100).images} == set(written)


def test_a_missing_chunk_is_detected(backend, store, site):
    stored = store.put(site, mammogram(3 * CHUNK))
    backend.raw.delete_chunk(stored.image_id, 1)

    with pytest.raises(MissingChunkError, match=f"chunk 1 of {stored.chunk_count} of image {stored.image_id} is missing"):
        store.get(site, stored.image_id)


def test_a_corrupted_chunk_is_detected(backend, store, site):
    stored = store.put(site, mammogram(3 * CHUNK))
    ciphertext = bytearray(backend.raw.chunk(stored.image_id, 2))
    ciphertext[len(ciphertext) // 2] ^= 0x01
    backend.raw.set_chunk(stored.image_id, 2, bytes(ciphertext))

    with pytest.raises(IntegrityError, match=f"chunk 2 of {stored.chunk_count} of image {stored.image_id} failed"):
        store.get(site, stored.image_id)


def test_a_chunk_swapped_between_two_images_is_detected(backend, store, site):
    first = store.put(site, mammogram(2 * CHUNK, seed=1))
    second = store.put(site, mammogram(2 * CHUNK, seed=2))
    backend.raw.set_chunk(first.image_id, 0, backend.raw.chunk(second.image_id, 0))

    with pytest.raises(IntegrityError, match=f"chunk 0 of 2 of image {first.image_id}"):
        store.get(site, first.image_id)
    assert store.get(site, second.image_id).data == mammogram(2 * CHUNK, seed=2)


def test_chunks_reordered_within_an_image_are_detected(backend, store, site):
    stored = store.put(site, mammogram(2 * CHUNK))
    zero, one = backend.raw.chunk(stored.image_id, 0), backend.raw.chunk(stored.image_id, 1)
    backend.raw.set_chunk(stored.image_id, 0, one)
    backend.raw.set_chunk(stored.image_id, 1, zero)

    with pytest.raises(IntegrityError, match="chunk 0 of 2"):
        store.get(site, stored.image_id)


def test_key_rotation_rewraps_data_keys_without_reencrypting_images(backend, site, tmp_path):
    keyring_path = tmp_path / "keyring.json"
    old_key = create_key(keyring_path)
    before = backend.open(Keyring.from_file(keyring_path))
    data = mammogram(2 * CHUNK + 1)
    stored = before.put(site, data)
    chunk_before = backend.raw.chunk(stored.image_id, 0)

    new_key = rotate_key(keyring_path)
    after = backend.open(Keyring.from_file(keyring_path))
    assert after.metadata(site, stored.image_id).key_id == old_key
    assert after.rewrap_keys(from_key_id=old_key) == 1
    retire_key(keyring_path, old_key)
    retired = backend.open(Keyring.from_file(keyring_path))

    read = retired.get(site, stored.image_id)
    assert read.data == data and read.metadata.key_id == new_key
    assert backend.raw.chunk(stored.image_id, 0) == chunk_before
    with pytest.raises(WrongKeyError, match=f"'{new_key}' is not in the keyring"):
        before.get(site, stored.image_id)


def test_rewrapping_passes_over_an_image_whose_key_was_destroyed(backend, store, site, caplog):
    # A `keys retire` shreds what the key still wrapped; a later rotation (or `store purge`) must
    # not stop at those images, which nothing can re-wrap.
    shredded = backend.open(Keyring.generate()).put(site, mammogram(500, seed=2))

    with caplog.at_level("WARNING", logger="api.store.base"):
        rewrapped = store.rewrap_keys(from_key_id=shredded.key_id)  # the keyspace is shared: only this key's

    assert rewrapped == 0
    assert f"image {shredded.image_id} of site {site} is wrapped by destroyed key {shredded.key_id}" in caplog.text


def test_reading_with_a_keyring_that_lacks_the_key_is_a_wrong_key_error(backend, store, site):
    stored = store.put(site, mammogram(1000))
    stranger = backend.open(Keyring.generate())

    with pytest.raises(WrongKeyError, match=f"'{stored.key_id}' is not in the keyring"):
        stranger.get(site, stored.image_id)
    page = stranger.list_site(site)
    assert page.images == [] and page.unreadable == [stored.image_id]


def test_one_unreadable_row_does_not_hide_the_rest_of_a_sites_listing(backend, store, site, caplog):
    readable = [store.put(site, mammogram(500, seed=seed)).image_id for seed in range(3)]
    lost = backend.open(Keyring.generate()).put(site, mammogram(500, seed=9)).image_id  # its key is not ours

    with caplog.at_level("ERROR", logger="api.store.base"):
        page = store.list_site(site)

    assert sorted(image.image_id for image in page.images) == sorted(readable)
    assert page.unreadable == [lost] and str(lost) in caplog.text


def test_a_deleted_image_is_gone_with_its_key_and_chunks(backend, store, site):
    stored = store.put(site, mammogram(3 * CHUNK))

    store.delete(site, stored.image_id)

    assert not store.exists(site, stored.image_id)
    for read in (store.get, store.metadata, store.delete):
        with pytest.raises(ImageNotFoundError, match=f"no image {stored.image_id} at site '{site}'"):
            read(site, stored.image_id)
    assert backend.raw.present_chunks(stored.image_id, stored.chunk_count) == []
    assert store.list_site(site).images == []


def test_a_deleted_images_key_and_ciphertext_are_in_no_file_of_the_sqlite_store(tmp_path, keyring, site):
    # WAL mode keeps the frames that wrote a row after the row is deleted: without a truncating
    # checkpoint the wrapped data key and the chunks stay on disk, decryptable with the keyring.
    path = tmp_path / "images.db"
    with SQLiteImageStore(path, keyring, chunk_size=CHUNK) as store:
        kept = store.put(site, mammogram(2 * CHUNK, seed=1))
        doomed = store.put(site, mammogram(3 * CHUNK, seed=2))
        raw = SQLiteRaw(path)
        wrapped = raw._connection.execute("SELECT wrapped_key FROM images WHERE image_id = ?",
                                          (doomed.image_id.bytes,)).fetchone()[0]
        chunks = [raw.chunk(doomed.image_id, index) for index in range(doomed.chunk_count)]
        raw._connection.close()

        def on_disk(secret: bytes) -> list[str]:
            return [file.name for file in path.parent.glob(path.name + "*") if secret in file.read_bytes()]

        assert on_disk(wrapped) and on_disk(chunks[0][:64])  # the check can see them while stored

        store.delete(site, doomed.image_id)

        for secret in [wrapped, *(chunk[:64] for chunk in chunks)]:
            assert on_disk(secret) == [], "a deleted image's bytes survive on disk"
        assert store.get(site, kept.image_id).data == mammogram(2 * CHUNK, seed=1)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_an_image_deleted_while_it_is_read_is_not_found_not_tampered_with(backend, store, site, monkeypatch):
    stored = store.put(site, mammogram(3 * CHUNK, seed=4))
    read_chunks = store._read_chunks

    def deleted_meanwhile(record):
        store.delete(site, stored.image_id)  # another request's DELETE, between the record and its chunks
        return read_chunks(record)

    monkeypatch.setattr(store, "_read_chunks", deleted_meanwhile)
    with pytest.raises(ImageNotFoundError, match=f"no image {stored.image_id}"):
        store.get(site, stored.image_id)


def test_listing_separates_sites_and_pages_through_each_image_once(store, site):
    other_site = site + "-other"
    mine = {store.put(site, mammogram(100, seed=n)).image_id for n in range(7)}
    theirs = {store.put(other_site, mammogram(100, seed=n)).image_id for n in range(2)}

    listed, token, pages = [], None, 0
    while True:
        page = store.list_site(site, page_size=3, page_token=token)
        listed += [image.image_id for image in page.images]
        pages += 1
        token = page.next_page_token
        if token is None:
            break

    assert sorted(listed) == sorted(mine) and pages >= 3
    assert {image.image_id for image in store.list_site(other_site).images} == theirs
    assert all(image.site_id == site for image in store.list_site(site).images)


def test_a_page_token_is_refused_for_another_site(store, site):
    for seed in range(3):
        store.put(site, mammogram(100, seed=seed))
    token = store.list_site(site, page_size=1).next_page_token

    with pytest.raises(InvalidRequestError, match="was not issued for site 'elsewhere'"):
        store.list_site("elsewhere", page_token=token)


def test_another_sites_image_is_not_found(store, site):
    stored = store.put(site, mammogram(100))

    assert not store.exists("another-site", stored.image_id)
    with pytest.raises(ImageNotFoundError, match="at site 'another-site'"):
        store.get("another-site", stored.image_id)
    with pytest.raises(ImageNotFoundError):
        store.delete("another-site", stored.image_id)
    assert store.exists(site, stored.image_id)


def test_a_failed_put_leaves_nothing_readable(backend, store, site, monkeypatch):
    attempted: list[uuid.UUID] = []
    encrypt = ImageCipher.encrypt_chunk

    def encrypt_then_fail(cipher, plaintext, *, index, count):
        attempted.append(cipher.image_id)
        if index == 2:
            raise OSError("simulated failure while writing chunk 2")
        return encrypt(cipher, plaintext, index=index, count=count)

    monkeypatch.setattr(ImageCipher, "encrypt_chunk", encrypt_then_fail)

    with pytest.raises(PartialWriteError, match="was not stored.*simulated failure"):
        store.put(site, mammogram(4 * CHUNK))

    image_id = attempted[0]
    assert not store.exists(site, image_id)
    assert store.list_site(site).images == []
    assert backend.raw.present_chunks(image_id, 4) == []


def test_an_expired_image_is_not_found(store, site):
    stored = store.put(site, mammogram(1000), ttl_seconds=1)
    assert store.metadata(site, stored.image_id).expires_at == stored.expires_at

    time.sleep(2.2)

    assert not store.exists(site, stored.image_id)
    with pytest.raises(ImageNotFoundError):
        store.get(site, stored.image_id)


def test_only_ciphertext_reaches_the_database(backend, store, site, keyring):
    data = MARKER + mammogram(2 * CHUNK) + MARKER
    stored = store.put(site, data, attributes={"note": MARKER.decode(), "source": "PATIENT^NAME^SECRET"})
    secrets = {
        "pixel marker": MARKER,
        "pixel pattern": PIXEL_PATTERN[:48],
        "attribute": b"PATIENT^NAME^SECRET",
        "sha256 (hex)": stored.sha256.encode(),
        "sha256 (raw)": bytes.fromhex(stored.sha256),
        "key-encryption key": keyring.material(keyring.active_key_id),
    }

    for value in backend.raw.every_stored_value():
        for name, secret in secrets.items():
            assert secret not in value, f"{name} found in the {backend.name} database"


def test_a_missing_schema_is_a_keyspace_missing_error(backend, keyring, tmp_path):
    with pytest.raises(KeyspaceMissingError, match="create"):
        if backend.name == "sqlite":
            SQLiteImageStore(tmp_path / "empty.db", keyring, create_schema=False)
        else:
            CassandraImageStore(CassandraSettings(keyspace="mammofl_absent", create_schema=False), keyring)


def test_an_unreachable_store_is_a_store_unavailable_error(backend, keyring, tmp_path):
    with pytest.raises(StoreUnavailableError) as raised:
        if backend.name == "sqlite":
            SQLiteImageStore(tmp_path / "no" / "such" / "folder" / "images.db", keyring)
        else:
            CassandraImageStore(CassandraSettings(port=1, connect_timeout_s=2), keyring)
    assert ("port 1" if backend.name == "cassandra" else "cannot be opened") in str(raised.value)


@pytest.mark.parametrize("call, complaint", [
    (lambda store: store.put("bad site!", b"x"), "site id 'bad site!' is invalid"),
    (lambda store: store.put("site-a", b""), "non-empty bytes"),
    (lambda store: store.put("site-a", b"x", ttl_seconds=0), "ttl_seconds 0"),
    (lambda store: store.put("site-a", b"x", attributes={"when": object()}), "JSON-serialisable"),
    (lambda store: store.list_site("site-a", page_size=0), "page_size 0"),
    (lambda store: store.list_site("site-a", page_token="garbage"), "page token"),
], ids=["site id", "empty image", "ttl", "attributes", "page size", "page token"])
def test_invalid_arguments_are_refused(store, call, complaint):
    with pytest.raises(InvalidRequestError, match=complaint):
        call(store)
