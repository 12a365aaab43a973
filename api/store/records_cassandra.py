"""API keys and predictions as tables in the image store's Cassandra keyspace.

``api_keys`` is one small partition per key (looked up by id on every request);
``predictions`` is partitioned by (site, image), so an image's history is one partition read
and deleting it is one partition delete. Listing keys scans ``api_keys``: there are few.
"""

from __future__ import annotations

import uuid
from datetime import timezone

from api.store.cassandra import CassandraImageStore
from api.store.records import ApiKeyRecord, PredictionRecord, ServiceRecords, opened_document, sealed_document

KEY_COLUMNS = "key_id, site_id, role, name, key_hash, created_at, expires_at, revoked_at, last_used_at"
ADDED_KEY_COLUMNS = ("expires_at", "revoked_at", "last_used_at")  # absent from keyspaces made before them
PING_KEY_ID = "readiness-probe"  # never a real key id (those are random hex)


class CassandraServiceRecords(ServiceRecords):
    def __init__(self, store: CassandraImageStore) -> None:
        self._store = store
        session, keyspace = store.session, store.settings.keyspace
        store.execute_schema(f"""CREATE TABLE IF NOT EXISTS {keyspace}.api_keys (
            key_id text PRIMARY KEY, site_id text, role text, name text, key_hash text, created_at timestamp,
            expires_at timestamp, revoked_at timestamp, last_used_at timestamp)""", "create the api_keys table")
        with store.driver_errors("read the api_keys table's columns"):
            present = {row.column_name for row in session.execute(
                "SELECT column_name FROM system_schema.columns WHERE keyspace_name = %s AND table_name = 'api_keys'",
                (keyspace,))}
        for column in ADDED_KEY_COLUMNS:
            if column not in present:
                store.execute_schema(f"ALTER TABLE {keyspace}.api_keys ADD {column} timestamp",
                                     f"add column {column} to the api_keys table")
        store.execute_schema(f"""CREATE TABLE IF NOT EXISTS {keyspace}.predictions (
            site_id text, image_id uuid, created_at timestamp, prediction_id uuid, document text,
            PRIMARY KEY ((site_id, image_id), created_at, prediction_id))""", "create the predictions table")
        with store.driver_errors("prepare the api_keys and predictions statements"):
            self._insert_key = session.prepare(
                f"INSERT INTO {keyspace}.api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
            self._select_key = session.prepare(f"SELECT {KEY_COLUMNS} FROM {keyspace}.api_keys WHERE key_id = ?")
            self._all_keys = session.prepare(f"SELECT {KEY_COLUMNS} FROM {keyspace}.api_keys")
            # Plain updates (no lightweight transaction): revoke_key reads the key first.
            self._revoke_key = session.prepare(f"UPDATE {keyspace}.api_keys SET revoked_at = ? WHERE key_id = ?")
            self._touch_key = session.prepare(f"UPDATE {keyspace}.api_keys SET last_used_at = ? WHERE key_id = ?")
            self._insert_prediction = session.prepare(
                f"INSERT INTO {keyspace}.predictions (site_id, image_id, created_at, prediction_id, document) "
                f"VALUES (?, ?, ?, ?, ?)")
            self._select_predictions = session.prepare(
                f"SELECT prediction_id, created_at, document FROM {keyspace}.predictions "
                f"WHERE site_id = ? AND image_id = ?")
            self._delete_predictions = session.prepare(
                f"DELETE FROM {keyspace}.predictions WHERE site_id = ? AND image_id = ?")
            # One partition of the keyspace at the store's consistency: system.local would answer
            # while too few replicas are up for any read or write (readiness would lie).
            self._ping = session.prepare(f"SELECT key_id FROM {keyspace}.api_keys WHERE key_id = ?")

    def add_key(self, record: ApiKeyRecord) -> None:
        self._run("store an API key", self._insert_key, (record.key_id, record.site_id, record.role, record.name,
                                                        record.key_hash, record.created_at, record.expires_at,
                                                        record.revoked_at, record.last_used_at))

    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        row = self._run("read an API key", self._select_key, (key_id,)).one()
        return None if row is None else _key_from_row(row)

    def list_keys(self, site_id: str | None = None) -> list[ApiKeyRecord]:
        records = [_key_from_row(row) for row in self._run("list API keys", self._all_keys, ())]
        chosen = [record for record in records if site_id is None or record.site_id == site_id]
        return sorted(chosen, key=lambda record: (record.created_at, record.key_id))

    def revoke_key(self, key_id: str, when) -> None:
        existing = self.get_key(key_id)
        if existing is not None and existing.revoked_at is None:
            self._run("revoke an API key", self._revoke_key, (when, key_id))

    def touch_key(self, key_id: str, when) -> None:
        self._run("record an API key's use", self._touch_key, (when, key_id))

    def add_prediction(self, record: PredictionRecord) -> None:
        self._run("store a prediction", self._insert_prediction, (
            record.site_id, record.image_id, record.created_at, record.prediction_id,
            sealed_document(self._store, record)))

    def list_predictions(self, site_id: str, image_id: uuid.UUID) -> list[PredictionRecord]:
        rows = self._run("list predictions", self._select_predictions, (site_id, image_id))
        return [PredictionRecord(site_id, image_id, row.prediction_id, row.created_at.replace(tzinfo=timezone.utc),
                                 opened_document(self._store, site_id, image_id, row.prediction_id, row.document))
                for row in rows]

    def delete_predictions(self, site_id: str, image_id: uuid.UUID) -> None:
        self._run("delete predictions", self._delete_predictions, (site_id, image_id))

    def ping(self) -> None:
        self._run("answer a ping", self._ping, (PING_KEY_ID,))

    def _run(self, action: str, statement, parameters: tuple):
        with self._store.driver_errors(action):
            return self._store.session.execute(statement, parameters)


def _key_from_row(row) -> ApiKeyRecord:
    return ApiKeyRecord(row.key_id, row.site_id, row.role, row.name, row.key_hash, _utc(row.created_at),
                        _utc(row.expires_at), _utc(row.revoked_at), _utc(row.last_used_at))


def _utc(moment):
    return None if moment is None else moment.replace(tzinfo=timezone.utc)
