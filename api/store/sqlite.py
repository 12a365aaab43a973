"""The embedded image store: one SQLite file, so the demo runs without a database server.

A put is one transaction, so a failed put leaves nothing behind at all. ``secure_delete`` makes
SQLite overwrite deleted rows (wrapped data keys included) with zeros instead of leaving them
in free pages. Expired images (``ttl_seconds``) are invisible at once and purged at the next put.
Each thread gets its own connection; WAL mode lets readers run beside the one writer.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

from api.crypto import Keyring, WrappedKey
from api.store.base import (
    DEFAULT_CHUNK_SIZE,
    ImageRecord,
    ImageStore,
    KeyspaceMissingError,
    PartialWriteError,
    StoreUnavailableError,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    site_id TEXT NOT NULL,
    image_id BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    sealed_metadata BLOB NOT NULL,
    expires_at_ms INTEGER,
    PRIMARY KEY (site_id, image_id)
);
CREATE TABLE IF NOT EXISTS image_chunks (
    image_id BLOB NOT NULL,
    chunk_index INTEGER NOT NULL,
    ciphertext BLOB NOT NULL,
    PRIMARY KEY (image_id, chunk_index)
);
CREATE INDEX IF NOT EXISTS images_by_expiry ON images (expires_at_ms) WHERE expires_at_ms IS NOT NULL;
"""
RECORD_COLUMNS = "site_id, image_id, created_at_ms, chunk_count, key_id, wrapped_key, sealed_metadata, expires_at_ms"
LIVE = "(expires_at_ms IS NULL OR expires_at_ms > ?)"
logger = logging.getLogger(__name__)
BUSY_TIMEOUT_S = 60.0
CHECKPOINT_ATTEMPTS = 20
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class SQLiteImageStore(ImageStore):
    """The image store in one SQLite database file."""

    def __init__(self, path: Path, keyring: Keyring, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 create_schema: bool = True) -> None:
        super().__init__(keyring, chunk_size=chunk_size)
        self._path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if create_schema:
            with _sqlite_errors(self._path, "cannot take the store's tables"):
                self._connection().executescript(SCHEMA)
        else:
            self._check_schema()

    def close(self) -> None:
        if self._connections:
            try:
                self.make_deletions_final()
            except StoreUnavailableError:
                pass  # closing a store whose file is gone: nothing left to make final
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()

    @property
    def path(self) -> Path:
        return self._path

    def read_rows(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        """Runs a query on this thread's connection; for tables that live beside the images."""
        return self._query(sql, parameters)

    @contextmanager
    def write_transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on this database, its errors turned into the store's."""
        with self._transaction() as connection:
            yield connection

    # --- backend primitives ------------------------------------------------------------------

    def _write(self, record: ImageRecord, chunks: Iterable[bytes]) -> None:
        with self._transaction() as connection:
            try:
                self._purge_expired(connection, _now_ms())
                connection.executemany(
                    "INSERT INTO image_chunks (image_id, chunk_index, ciphertext) VALUES (?, ?, ?)",
                    ((record.image_id.bytes, index, chunk) for index, chunk in enumerate(chunks)))
                connection.execute(
                    f"INSERT INTO images ({RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    _row_from_record(record))
            except Exception as error:
                raise PartialWriteError(f"image {record.image_id} for site '{record.site_id}' was not stored "
                                        f"(its transaction was rolled back): {error}") from error

    def _read_record(self, site_id: str, image_id: uuid.UUID) -> ImageRecord | None:
        rows = self._query(f"SELECT {RECORD_COLUMNS} FROM images WHERE site_id = ? AND image_id = ? AND {LIVE}",
                           (site_id, image_id.bytes, _now_ms()))
        return _record_from_row(rows[0]) if rows else None

    def _read_chunks(self, record: ImageRecord) -> Iterator[bytes | None]:
        rows = self._query("SELECT chunk_index, ciphertext FROM image_chunks WHERE image_id = ? "
                           "AND chunk_index < ? ORDER BY chunk_index", (record.image_id.bytes, record.chunk_count))
        found = dict(rows)
        return (found.get(index) for index in range(record.chunk_count))

    def _remove(self, record: ImageRecord) -> None:
        with self._transaction() as connection:
            connection.execute("DELETE FROM images WHERE site_id = ? AND image_id = ?",
                               (record.site_id, record.image_id.bytes))
            connection.execute("DELETE FROM image_chunks WHERE image_id = ?", (record.image_id.bytes,))
        self.make_deletions_final()

    def make_deletions_final(self) -> None:
        """Leave no copy of deleted rows in any file: the database and its write-ahead log.

        ``secure_delete`` zeroes a deleted row's pages in the database, but the WAL still holds
        the frames that wrote them (the wrapped data key and the ciphertext) until a checkpoint
        copies the zeroed pages back and the log is truncated. Concurrent readers can hold a
        checkpoint off; it is retried for about ten seconds, then a warning says the deletion is
        not final yet (the rows are gone from every query either way; the next deletion's
        checkpoint, or closing the store, completes it).
        """
        connection = self._connection()
        for attempt in range(CHECKPOINT_ATTEMPTS):
            with _sqlite_errors(self._path, "could not checkpoint its write-ahead log"):
                busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return
            time.sleep(0.05 * (attempt + 1))
        logger.warning("SQLite database %s: readers held off the checkpoint that makes a deletion final; the "
                       "deleted rows remain in its write-ahead log until the next deletion or close", self._path)

    def _list_records(self, site_id: str, page_size: int,
                      position: bytes | None) -> tuple[list[ImageRecord], bytes | None]:
        rows = self._query(f"SELECT {RECORD_COLUMNS} FROM images WHERE site_id = ? AND image_id > ? AND {LIVE} "
                           f"ORDER BY image_id LIMIT ?", (site_id, position or b"", _now_ms(), page_size + 1))
        records = [_record_from_row(row) for row in rows[:page_size]]
        more = len(rows) > page_size
        return records, (records[-1].image_id.bytes if more else None)

    def _records_not_wrapped_by(self, key_id: str) -> Iterator[ImageRecord]:
        rows = self._query(f"SELECT {RECORD_COLUMNS} FROM images WHERE key_id != ? AND {LIVE}", (key_id, _now_ms()))
        return (_record_from_row(row) for row in rows)

    def _replace_key(self, record: ImageRecord, wrapped: WrappedKey) -> bool:
        with self._transaction() as connection:
            cursor = connection.execute(
                "UPDATE images SET key_id = ?, wrapped_key = ? WHERE site_id = ? AND image_id = ? AND key_id = ?",
                (wrapped.key_id, wrapped.ciphertext, record.site_id, record.image_id.bytes, record.key_id))
        return cursor.rowcount == 1

    # --- connections -------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _connect(self) -> sqlite3.Connection:
        _private_file(self._path)
        with _sqlite_errors(self._path, "cannot be opened (does its folder exist, is it writable?)"):
            # isolation_level=None: no implicit transactions; writes open theirs with BEGIN IMMEDIATE.
            # check_same_thread=False only so that close() may close every thread's connection;
            # each connection is otherwise used by the thread that opened it.
            connection = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                         check_same_thread=False)
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute("PRAGMA secure_delete = ON")
        return connection

    def _query(self, sql: str, parameters: tuple) -> list[tuple]:
        with _sqlite_errors(self._path, "failed"):
            return self._connection().execute(sql, parameters).fetchall()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the write lock from its start, committed on success."""
        connection = self._connection()
        with _sqlite_errors(self._path, "failed"):
            connection.execute("BEGIN IMMEDIATE")
            with connection:
                yield connection

    def _check_schema(self) -> None:
        present = {name for (name,) in self._query(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('images', 'image_chunks')", ())}
        if present != {"images", "image_chunks"}:
            raise KeyspaceMissingError(f"SQLite database {self._path} lacks the tables images and image_chunks; "
                                       f"open it with create_schema=True to create them")

    @staticmethod
    def _purge_expired(connection: sqlite3.Connection, now: int) -> None:
        expired = [image_id for (image_id,) in connection.execute(
            "SELECT image_id FROM images WHERE expires_at_ms <= ?", (now,))]
        connection.executemany("DELETE FROM images WHERE image_id = ?", ((image_id,) for image_id in expired))
        connection.executemany("DELETE FROM image_chunks WHERE image_id = ?", ((image_id,) for image_id in expired))


@contextmanager
def _sqlite_errors(path: Path, failure: str) -> Iterator[None]:
    """Turns SQLite's errors (locked too long, disk I/O, tables gone) into the store's."""
    try:
        yield
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            raise KeyspaceMissingError(f"SQLite database {path} lacks the store's tables: {error}") from error
        raise StoreUnavailableError(f"SQLite database {path} {failure}: {error}") from error
    except sqlite3.Error as error:
        raise StoreUnavailableError(f"SQLite database {path} {failure}: {error}") from error


def _private_file(path: Path) -> None:
    """Create the database file readable by its owner only (0600; SQLite's -wal and -shm files
    take the database file's permissions)."""
    if not path.parent.is_dir():
        return  # SQLite's own error names the missing folder
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _row_from_record(record: ImageRecord) -> tuple:
    return (record.site_id, record.image_id.bytes, _ms_from_datetime(record.created_at), record.chunk_count,
            record.key_id, record.wrapped_key, record.sealed_metadata, _ms_from_datetime(record.expires_at))


def _record_from_row(row: tuple) -> ImageRecord:
    site_id, image_id, created_at_ms, chunk_count, key_id, wrapped_key, sealed_metadata, expires_at_ms = row
    return ImageRecord(site_id, uuid.UUID(bytes=image_id), _datetime_from_ms(created_at_ms), chunk_count,
                       key_id, wrapped_key, sealed_metadata, _datetime_from_ms(expires_at_ms))


def _ms_from_datetime(moment: datetime | None) -> int | None:
    return None if moment is None else (moment - EPOCH) // timedelta(milliseconds=1)


def _datetime_from_ms(milliseconds: int | None) -> datetime | None:
    return None if milliseconds is None else EPOCH + timedelta(milliseconds=milliseconds)
