"""One way to open the store: the image store of a backend and the service records beside it.

The service (`api.services`), ``mammofl api-keys`` and ``mammofl keys rotate|store purge`` all
open it here, so that a backend's schema handling, its records and its clean-up on failure are
the same for every caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from api.crypto import Keyring
from api.store.base import ImageStore
from api.store.cassandra import CassandraSettings
from api.store.records import ServiceRecords


@dataclass(frozen=True)
class StoreLocation:
    """Where the store is: the embedded SQLite file or a Cassandra keyspace."""

    backend: Literal["sqlite", "cassandra"]
    sqlite_path: Path = Path("data/api/store.sqlite")
    cassandra: CassandraSettings = field(default_factory=CassandraSettings)

    def describe(self) -> str:
        if self.backend == "sqlite":
            return f"SQLite store {self.sqlite_path}"
        return (f"Cassandra keyspace {self.cassandra.keyspace} at {', '.join(self.cassandra.contact_points)} "
                f"port {self.cassandra.port}")


class OpenStore(NamedTuple):
    images: ImageStore
    records: ServiceRecords


def open_store(location: StoreLocation, keyring: Keyring, *, create_schema: bool = True) -> OpenStore:
    """The image store and its records; ``create_schema=False`` (the maintenance commands) refuses a
    store that does not exist yet instead of creating an empty one."""
    images: ImageStore
    if location.backend == "cassandra":
        from api.store.cassandra import CassandraImageStore
        from api.store.records_cassandra import CassandraServiceRecords

        images = CassandraImageStore(location.cassandra.model_copy(update={"create_schema": create_schema}), keyring)
        records_type: type = CassandraServiceRecords
    elif location.backend == "sqlite":
        from api.store.records_sqlite import SQLiteServiceRecords
        from api.store.sqlite import SQLiteImageStore

        if create_schema:
            location.sqlite_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        images = SQLiteImageStore(location.sqlite_path, keyring, create_schema=create_schema)
        records_type = SQLiteServiceRecords
    else:
        raise ValueError(f"store backend {location.backend!r} is not one of: sqlite, cassandra")
    try:
        return OpenStore(images, records_type(images))
    except BaseException:
        images.close()
        raise
