"""API keys and predictions as tables in the embedded store's SQLite file."""

from __future__ import annotations

import uuid
from datetime import datetime

from api.store.records import ApiKeyRecord, PredictionRecord, ServiceRecords, opened_document, sealed_document
from api.store.sqlite import SQLiteImageStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS predictions (
    site_id TEXT NOT NULL,
    image_id BLOB NOT NULL,
    prediction_id BLOB NOT NULL,
    created_at TEXT NOT NULL,
    document TEXT NOT NULL,
    PRIMARY KEY (site_id, image_id, prediction_id)
);
"""
KEY_COLUMNS = "key_id, site_id, role, name, key_hash, created_at, expires_at, revoked_at, last_used_at"
ADDED_KEY_COLUMNS = ("expires_at", "revoked_at", "last_used_at")  # absent from stores made before them


class SQLiteServiceRecords(ServiceRecords):
    def __init__(self, store: SQLiteImageStore) -> None:
        self._store = store
        with store.write_transaction() as connection:
            for statement in filter(str.strip, SCHEMA.split(";")):
                connection.execute(statement)
            present = {row[1] for row in connection.execute("PRAGMA table_info(api_keys)")}
            for column in ADDED_KEY_COLUMNS:
                if column not in present:
                    connection.execute(f"ALTER TABLE api_keys ADD COLUMN {column} TEXT")

    def add_key(self, record: ApiKeyRecord) -> None:
        with self._store.write_transaction() as connection:
            connection.execute(f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (record.key_id, record.site_id, record.role, record.name, record.key_hash,
                                record.created_at.isoformat(), _text(record.expires_at), _text(record.revoked_at),
                                _text(record.last_used_at)))

    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = self._store.read_rows(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,))
        return _key_from_row(rows[0]) if rows else None

    def list_keys(self, site_id: str | None = None) -> list[ApiKeyRecord]:
        if site_id is None:
            rows = self._store.read_rows(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, key_id")
        else:
            rows = self._store.read_rows(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE site_id = ? "
                                         f"ORDER BY created_at, key_id", (site_id,))
        return [_key_from_row(row) for row in rows]

    def revoke_key(self, key_id: str, when: datetime) -> None:
        with self._store.write_transaction() as connection:
            connection.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                               (when.isoformat(), key_id))

    def touch_key(self, key_id: str, when: datetime) -> None:
        with self._store.write_transaction() as connection:
            connection.execute("UPDATE api_keys SET last_used_at = ? WHERE key_id = ?", (when.isoformat(), key_id))

    def add_prediction(self, record: PredictionRecord) -> None:
        with self._store.write_transaction() as connection:
            connection.execute(
                "INSERT INTO predictions (site_id, image_id, prediction_id, created_at, document) VALUES (?, ?, ?, ?, ?)",
                (record.site_id, record.image_id.bytes, record.prediction_id.bytes, record.created_at.isoformat(),
                 sealed_document(self._store, record)))

    def list_predictions(self, site_id: str, image_id: uuid.UUID) -> list[PredictionRecord]:
        rows = self._store.read_rows(
            "SELECT prediction_id, created_at, document FROM predictions WHERE site_id = ? AND image_id = ? "
            "ORDER BY created_at, prediction_id", (site_id, image_id.bytes))
        return [PredictionRecord(site_id, image_id, uuid.UUID(bytes=prediction_id), datetime.fromisoformat(created_at),
                                 opened_document(self._store, site_id, image_id, uuid.UUID(bytes=prediction_id), document))
                for prediction_id, created_at, document in rows]

    def delete_predictions(self, site_id: str, image_id: uuid.UUID) -> None:
        with self._store.write_transaction() as connection:
            connection.execute("DELETE FROM predictions WHERE site_id = ? AND image_id = ?", (site_id, image_id.bytes))

    def ping(self) -> None:
        self._store.read_rows("SELECT 1")


def _key_from_row(row: tuple) -> ApiKeyRecord:
    key_id, site_id, role, name, key_hash, created_at, expires_at, revoked_at, last_used_at = row
    return ApiKeyRecord(key_id, site_id, role, name, key_hash, datetime.fromisoformat(created_at),
                        _moment(expires_at), _moment(revoked_at), _moment(last_used_at))


def _text(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _moment(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
