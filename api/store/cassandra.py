"""The image store on Apache Cassandra.

Two tables. ``images`` holds one record per image, partitioned by site so that listing a site
reads one partition (about 0.3 KB per image: fine into the hundreds of thousands of images per
site; past that the partition key would need a time bucket); ``image_chunks`` holds each chunk in a partition of its own, keyed by
(image_id, chunk_index), so that an image of any size spreads over the ring and no partition
grows past one chunk (at most 1 MiB plus 28 bytes of nonce and tag). Chunks go out concurrently
(``concurrency`` in flight), never in a batch; the record goes last, as the commit marker.
Compression is off: every blob is ciphertext, which does not compress.

Every statement is prepared and idempotent except the conditional key replacement of
:meth:`rewrap_keys`, a lightweight transaction so that a concurrent delete is never undone.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from typing import Any, Literal

from cassandra import (
    ConsistencyLevel,
    CoordinationFailure,
    DriverException,
    InvalidRequest,
    OperationTimedOut,
    Timeout,
    Unavailable,
)
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.connection import ConnectionBusy
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.protocol import ErrorMessage
from cassandra.query import PreparedStatement
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from api.crypto import Keyring, WrappedKey
from api.store.base import (
    DEFAULT_CHUNK_SIZE,
    ImageRecord,
    ImageStore,
    InvalidRequestError,
    KeyspaceMissingError,
    PartialWriteError,
    StoreError,
    StoreUnavailableError,
)

# Errors that mean "not reachable now" (timeouts, too few replicas), as opposed to "refused".
UNAVAILABLE = (NoHostAvailable, OperationTimedOut, Unavailable, Timeout, CoordinationFailure)
RECORD_COLUMNS = "site_id, image_id, created_at, chunk_count, key_id, wrapped_key, sealed_metadata, expires_at"
BACKPRESSURE_RETRIES = 200
BACKPRESSURE_PAUSE_S = 0.005
REWRAP_SCAN_PAGE = 500


class CassandraSettings(BaseModel):
    """Where the store's Cassandra is and how it is used.

    Replication: ``replication_factor`` with SimpleStrategy (one node, tests), or
    ``datacenters`` (data centre -> replicas) with NetworkTopologyStrategy (clusters). It applies
    when the store creates the keyspace; an existing keyspace is left as it is.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    contact_points: tuple[str, ...] = ("127.0.0.1",)
    port: int = Field(9042, ge=1, le=65535)
    keyspace: str = Field("mammofl", pattern=r"^[a-z][a-z0-9_]{0,47}$")
    local_dc: str = "datacenter1"
    replication_factor: PositiveInt = 1
    datacenters: dict[str, PositiveInt] = Field(default_factory=dict)
    consistency: Literal["ONE", "LOCAL_ONE", "QUORUM", "LOCAL_QUORUM", "EACH_QUORUM", "ALL"] = "LOCAL_QUORUM"
    serial_consistency: Literal["SERIAL", "LOCAL_SERIAL"] = "LOCAL_SERIAL"
    create_schema: bool = True
    # Requests in flight per image; past the socket's send buffer more only queue in the driver.
    concurrency: int = Field(4, ge=1, le=64)
    connect_timeout_s: float = Field(10.0, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    # How long a schema change waits for every node to agree; past it the driver only logs, and a
    # statement prepared next on a node that lags fails ("table ... does not exist").
    schema_agreement_timeout_s: float = Field(60.0, gt=0)
    # Protocol v4: with v5 the driver checksums every 128 KiB frame segment in Python, and reads
    # of MiB-sized chunks measured about a third slower here. None lets the driver negotiate.
    protocol_version: int | None = 4

    def replication(self) -> dict[str, Any]:
        if self.datacenters:
            return {"class": "NetworkTopologyStrategy", **self.datacenters}
        return {"class": "SimpleStrategy", "replication_factor": self.replication_factor}


class CassandraImageStore(ImageStore):
    """The image store in a Cassandra keyspace; connects (and creates the schema) on construction."""

    def __init__(self, settings: CassandraSettings, keyring: Keyring, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__(keyring, chunk_size=chunk_size)
        self._settings = settings
        self._where = f"Cassandra at {', '.join(settings.contact_points)} port {settings.port}"
        self._cluster = _cluster(settings)
        try:
            with self._errors("connect"):
                self._session = self._cluster.connect()
            self._schema()
            self._statements = _Statements(self._session, settings)
        except BaseException:
            self._cluster.shutdown()
            raise

    def close(self) -> None:
        self._cluster.shutdown()

    @property
    def session(self) -> Session:
        """The driver session, for tables that live beside the images in the same keyspace."""
        return self._session

    @property
    def settings(self) -> CassandraSettings:
        return self._settings

    def driver_errors(self, action: str) -> AbstractContextManager[None]:
        """The driver's errors turned into the store's, naming ``action``."""
        return self._errors(action)

    # --- backend primitives ------------------------------------------------------------------

    def _write(self, record: ImageRecord, chunks: Iterable[bytes]) -> None:
        ttl = _ttl(record.expires_at)
        if ttl is None:
            raise StoreError(f"image {record.image_id} expired before it was written")
        try:
            with self._errors("write image chunks"):
                parameters = ((record.image_id, index, chunk, ttl) for index, chunk in enumerate(chunks))
                for _ in execute_concurrently(self._session, self._statements.insert_chunk, parameters,
                                              self._settings.concurrency):
                    pass
            with self._errors("write the image record"):
                self._session.execute(self._statements.insert_record, (*_row_from_record(record), ttl))
        except Exception as error:
            raise PartialWriteError(f"image {record.image_id} for site '{record.site_id}' was not stored: "
                                    f"{error}; {self._discard(record)}") from error

    def _read_record(self, site_id: str, image_id: uuid.UUID) -> ImageRecord | None:
        with self._errors("read an image record"):
            row = self._session.execute(self._statements.select_record, (site_id, image_id)).one()
        return None if row is None else _record_from_row(row)

    def _read_chunks(self, record: ImageRecord) -> Iterator[bytes | None]:
        with self._errors("read image chunks"):
            for result in execute_concurrently(self._session, self._statements.select_chunk, _chunk_keys(record),
                                               self._settings.concurrency):
                row = result.one()
                yield None if row is None else row.ciphertext

    def _remove(self, record: ImageRecord) -> None:
        with self._errors("delete an image"):
            self._session.execute(self._statements.delete_record, (record.site_id, record.image_id))
            for _ in execute_concurrently(self._session, self._statements.delete_chunk, _chunk_keys(record),
                                          self._settings.concurrency):
                pass

    def _list_records(self, site_id: str, page_size: int,
                      position: bytes | None) -> tuple[list[ImageRecord], bytes | None]:
        statement = self._statements.list_site.bind((site_id,))
        statement.fetch_size = page_size
        try:
            with self._errors("list a site's images"):
                result = self._session.execute(statement, paging_state=position)
        except StoreError as error:
            if not isinstance(error, StoreUnavailableError) and position is not None:
                raise InvalidRequestError(f"page token for site '{site_id}' was rejected by Cassandra; pass "
                                          f"back a next_page_token from listing this site") from error
            raise
        records = (_record_from_row(row) for row in result.current_rows)
        return [record for record in records if record is not None], result.paging_state

    def _records_not_wrapped_by(self, key_id: str) -> Iterator[ImageRecord]:
        statement = self._statements.scan_records.bind(())
        statement.fetch_size = REWRAP_SCAN_PAGE
        with self._errors("scan image records"):
            for row in self._session.execute(statement):
                record = _record_from_row(row)
                if record is not None and record.key_id != key_id:
                    yield record

    def _replace_key(self, record: ImageRecord, wrapped: WrappedKey) -> bool:
        ttl = _ttl(record.expires_at)
        if ttl is None:
            return False
        with self._errors("replace a wrapped data key"):
            result = self._session.execute(self._statements.replace_key, (
                ttl, wrapped.key_id, wrapped.ciphertext, record.site_id, record.image_id, record.key_id))
        return result.was_applied

    # --- helpers -----------------------------------------------------------------------------

    def _schema(self) -> None:
        keyspace = self._settings.keyspace
        if self._settings.create_schema:
            with self._errors("create the keyspace and tables"):
                for statement in _schema_statements(keyspace, self._settings.replication()):
                    self._execute_schema(statement)
            return
        tables = self._cluster.metadata.keyspaces.get(keyspace)
        if tables is None or not {"images", "image_chunks"} <= set(tables.tables):
            raise KeyspaceMissingError(f"{self._where} has no keyspace '{keyspace}' with tables images and "
                                       f"image_chunks; create them (create_schema=True) or name another keyspace")

    def _execute_schema(self, statement: str) -> None:
        """One CREATE ... IF NOT EXISTS, retried on a timeout: idempotent, and a cluster that has just
        started can take longer than a request's timeout to agree on a schema change (measured: a
        three-node cluster on 2 busy cores timed the keyspace out once in two test runs). Returns
        once every node agrees on the new schema: a write to a table a replica does not know yet
        fails (INCOMPATIBLE_SCHEMA, seen once on the busy three-node cluster)."""
        for attempt in range(1, _SCHEMA_ATTEMPTS + 1):
            try:
                result = self._session.execute(statement, timeout=_SCHEMA_TIMEOUT_S)
                break
            except OperationTimedOut:
                if attempt == _SCHEMA_ATTEMPTS:
                    raise
        if not result.response_future.is_schema_agreed:
            # The driver's own wait after the change ran out: wait again, once, then give up loudly.
            self._cluster.refresh_schema_metadata(max_schema_agreement_wait=self._settings.schema_agreement_timeout_s)

    def execute_schema(self, statement: str, action: str) -> None:
        """A schema change of the store's keyspace (the service records' tables), as the store makes its own."""
        with self._errors(action):
            self._execute_schema(statement)

    def _discard(self, record: ImageRecord) -> str:
        """Best-effort removal after a failed write; says how it went, for the error message."""
        try:
            self._remove(record)
        except StoreError as error:
            return (f"removing what was written failed too ({error}); the chunks left behind cannot be "
                    f"decrypted, since their data key was never stored")
        return "what was written has been removed"

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turns the driver's errors into the store's, naming what was being done."""
        try:
            yield
        except UNAVAILABLE as error:
            raise StoreUnavailableError(f"{self._where} could not {action}: {error}") from error
        except InvalidRequest as error:
            if "does not exist" in str(error) or "unconfigured table" in str(error):
                raise KeyspaceMissingError(f"{self._where} could not {action}: keyspace "
                                           f"'{self._settings.keyspace}' or its tables are gone ({error})") from error
            raise StoreError(f"{self._where} refused to {action}: {error}") from error
        except (DriverException, ErrorMessage) as error:
            raise StoreError(f"{self._where} refused to {action}: {error}") from error


class _Statements:
    """The store's statements, prepared once per session."""

    def __init__(self, session: Session, settings: CassandraSettings) -> None:
        keyspace = settings.keyspace

        def prepare(cql: str, *, idempotent: bool = True) -> PreparedStatement:
            statement = session.prepare(cql)
            statement.is_idempotent = idempotent
            return statement

        self.insert_chunk = prepare(f"INSERT INTO {keyspace}.image_chunks (image_id, chunk_index, ciphertext) "
                                    f"VALUES (?, ?, ?) USING TTL ?")
        self.insert_record = prepare(f"INSERT INTO {keyspace}.images ({RECORD_COLUMNS}) "
                                     f"VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?")
        self.select_record = prepare(f"SELECT {RECORD_COLUMNS} FROM {keyspace}.images "
                                     f"WHERE site_id = ? AND image_id = ?")
        self.select_chunk = prepare(f"SELECT ciphertext FROM {keyspace}.image_chunks "
                                    f"WHERE image_id = ? AND chunk_index = ?")
        self.delete_record = prepare(f"DELETE FROM {keyspace}.images WHERE site_id = ? AND image_id = ?")
        self.delete_chunk = prepare(f"DELETE FROM {keyspace}.image_chunks WHERE image_id = ? AND chunk_index = ?")
        self.list_site = prepare(f"SELECT {RECORD_COLUMNS} FROM {keyspace}.images WHERE site_id = ?")
        self.scan_records = prepare(f"SELECT {RECORD_COLUMNS} FROM {keyspace}.images")
        self.replace_key = prepare(f"UPDATE {keyspace}.images USING TTL ? SET key_id = ?, wrapped_key = ? "
                                   f"WHERE site_id = ? AND image_id = ? IF key_id = ?", idempotent=False)


def execute_concurrently(session: Session, statement: PreparedStatement, parameter_sets: Iterable[tuple],
                         concurrency: int) -> Iterator[Any]:
    """Runs the statement once per parameter set, ``concurrency`` at a time; yields results in order.

    Not ``cassandra.concurrent.execute_concurrent``: that fails a request the driver refuses with
    ConnectionBusy (the socket's send buffer is full of large chunks: back-pressure, not an error),
    whereas this waits a moment and sends it again.
    """
    pending: deque[tuple[ResponseFuture, tuple]] = deque()
    for parameters in parameter_sets:
        if len(pending) == concurrency:
            yield _result(session, statement, *pending.popleft())
        pending.append((session.execute_async(statement, parameters), parameters))
    while pending:
        yield _result(session, statement, *pending.popleft())


def _result(session: Session, statement: PreparedStatement, future: ResponseFuture, parameters: tuple) -> Any:
    for attempt in range(1, BACKPRESSURE_RETRIES + 1):
        try:
            return future.result()
        except NoHostAvailable as error:
            if not all(isinstance(cause, ConnectionBusy) for cause in error.errors.values()):
                raise
        time.sleep(BACKPRESSURE_PAUSE_S * min(attempt, 20))
        future = session.execute_async(statement, parameters)
    return future.result()


def _cluster(settings: CassandraSettings) -> Cluster:
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=settings.local_dc)),
        consistency_level=ConsistencyLevel.name_to_value[settings.consistency],
        serial_consistency_level=ConsistencyLevel.name_to_value[settings.serial_consistency],
        request_timeout=settings.request_timeout_s)
    options: dict[str, Any] = {} if settings.protocol_version is None else {"protocol_version": settings.protocol_version}
    return Cluster(list(settings.contact_points), port=settings.port, compression=False,
                   connect_timeout=settings.connect_timeout_s,
                   max_schema_agreement_wait=settings.schema_agreement_timeout_s,
                   execution_profiles={EXEC_PROFILE_DEFAULT: profile}, **options)


_SCHEMA_ATTEMPTS = 3
_SCHEMA_TIMEOUT_S = 60.0


def _schema_statements(keyspace: str, replication: Mapping[str, Any]) -> list[str]:
    replication_cql = ", ".join(f"'{name}': '{value}'" for name, value in replication.items())
    return [
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {{{replication_cql}}}",
        f"""CREATE TABLE IF NOT EXISTS {keyspace}.images (
            site_id text, image_id uuid, created_at timestamp, chunk_count int, key_id text,
            wrapped_key blob, sealed_metadata blob, expires_at timestamp,
            PRIMARY KEY ((site_id), image_id))
            WITH compression = {{'enabled': 'false'}}""",
        f"""CREATE TABLE IF NOT EXISTS {keyspace}.image_chunks (
            image_id uuid, chunk_index int, ciphertext blob,
            PRIMARY KEY ((image_id, chunk_index)))
            WITH compression = {{'enabled': 'false'}}""",
    ]


def _ttl(expires_at: datetime | None) -> int | None:
    """Seconds to live for CQL's USING TTL (0: forever); None once ``expires_at`` has passed."""
    if expires_at is None:
        return 0
    remaining = math.ceil((expires_at - datetime.now(timezone.utc)).total_seconds())
    return remaining if remaining > 0 else None


def _chunk_keys(record: ImageRecord) -> Iterator[tuple[uuid.UUID, int]]:
    return ((record.image_id, index) for index in range(record.chunk_count))


def _row_from_record(record: ImageRecord) -> tuple:
    return (record.site_id, record.image_id, record.created_at, record.chunk_count, record.key_id,
            record.wrapped_key, record.sealed_metadata, record.expires_at)


def _record_from_row(row: Any) -> ImageRecord | None:
    """None for a row some of whose cells have expired: a re-wrapped key may outlive the rest by a second."""
    if any(value is None for name, value in row._asdict().items() if name != "expires_at"):
        return None
    return ImageRecord(row.site_id, row.image_id, _utc(row.created_at), row.chunk_count, row.key_id,
                       row.wrapped_key, row.sealed_metadata, _utc(row.expires_at))


def _utc(moment: datetime | None) -> datetime | None:
    """The driver returns naive datetimes in UTC."""
    return None if moment is None else moment.replace(tzinfo=timezone.utc)
