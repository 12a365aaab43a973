"""The encrypted image store: one interface, a Cassandra backend and an embedded SQLite default."""

from api.crypto import CryptoError, IntegrityError, KeyringError, WrongKeyError
from api.store.base import (
    ImageMetadata,
    ImageNotFoundError,
    ImagePage,
    ImageStore,
    InvalidRequestError,
    KeyspaceMissingError,
    MissingChunkError,
    PartialWriteError,
    StoredImage,
    StoreError,
    StoreUnavailableError,
)
from api.store.cassandra import CassandraImageStore, CassandraSettings
from api.store.sqlite import SQLiteImageStore

__all__ = [
    "CassandraImageStore", "CassandraSettings", "CryptoError", "ImageMetadata", "ImageNotFoundError",
    "ImagePage", "ImageStore", "IntegrityError", "InvalidRequestError", "KeyringError",
    "KeyspaceMissingError", "MissingChunkError", "PartialWriteError", "SQLiteImageStore", "StoredImage",
    "StoreError", "StoreUnavailableError", "WrongKeyError",
]
