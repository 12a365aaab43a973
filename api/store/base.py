"""The encrypted image store: its interface, what it returns, and how it fails.

An :class:`ImageStore` keeps de-identified mammograms for many sites (tenants). Every call names
the site, and a site never sees another site's images. The store encrypts before anything leaves
the process (see :mod:`api.crypto`); a backend (Cassandra, SQLite) only ever holds:

- per image, one *record*: site id, image id, creation time, chunk count, the id of the
  key-encryption key, the wrapped data key and the sealed metadata;
- per chunk of the image, its ciphertext, keyed by image id and index.

Everything else -- content type, size, the plaintext's sha256 and the caller's attributes -- is
inside the sealed metadata. The sha256 in particular is never stored in the clear: a plain hash
of a published image would let anyone holding that image confirm it is in the store.

The record is written after every chunk and is the commit marker: an image whose record is
absent does not exist, and its data key (inside the record) is never stored, so chunks left
behind by a failed write are unreadable. Deleting removes the record first, which destroys the
wrapped data key (crypto-shredding), then the chunks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from api.crypto import CryptoError, ImageCipher, IntegrityError, Keyring, WrappedKey, WrongKeyError
from common.errors import MammoflError

logger = logging.getLogger(__name__)

MIN_CHUNK_SIZE = 256 * 1024
MAX_CHUNK_SIZE = 1024 * 1024
DEFAULT_CHUNK_SIZE = MAX_CHUNK_SIZE
MAX_PAGE_SIZE = 1000
SITE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

__all__ = [
    "CryptoError", "DEFAULT_CHUNK_SIZE", "ImageMetadata", "ImageNotFoundError", "ImagePage",
    "ImageStore", "IntegrityError", "InvalidRequestError", "KeyspaceMissingError",
    "MissingChunkError", "PartialWriteError", "StoreError", "StoreUnavailableError",
    "StoredImage", "WrongKeyError",
]


class StoreError(MammoflError):
    """The image store failed; the subclasses say how."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached or did not answer in time."""


class KeyspaceMissingError(StoreError):
    """The store's keyspace (Cassandra) or tables (SQLite) are absent and were not to be created."""


class ImageNotFoundError(StoreError):
    """No committed image has this id at this site (never stored, deleted, expired, or another site's)."""


class PartialWriteError(StoreError):
    """A put failed part way; the image was not committed and nothing of it is readable."""


class InvalidRequestError(StoreError):
    """A call's arguments are invalid (site id, page size or token, attributes...)."""


class MissingChunkError(IntegrityError):
    """A committed image lacks one of its chunks."""


@dataclass(frozen=True)
class ImageMetadata:
    """What is known about a stored image, decrypted; ``attributes`` is the caller's own dict."""

    image_id: uuid.UUID
    site_id: str
    content_type: str
    size: int
    sha256: str
    created_at: datetime
    chunk_count: int
    key_id: str
    attributes: Mapping[str, Any]
    expires_at: datetime | None = None


@dataclass(frozen=True)
class StoredImage:
    metadata: ImageMetadata
    data: bytes


@dataclass(frozen=True)
class ImagePage:
    """One page of a site's images; pass ``next_page_token`` back for the next, None after the last."""

    images: list[ImageMetadata]
    next_page_token: str | None
    unreadable: list[uuid.UUID] = field(default_factory=list)  # rows whose key or metadata would not open


@dataclass(frozen=True)
class ImageRecord:
    """One image's row as a backend stores it: nothing in it is readable without the keyring."""

    site_id: str
    image_id: uuid.UUID
    created_at: datetime
    chunk_count: int
    key_id: str
    wrapped_key: bytes
    sealed_metadata: bytes
    expires_at: datetime | None


class ImageStore(ABC):
    """Put, get, list, delete encrypted images; the backends supply storage primitives only.

    Safe to share between threads. Contracts every backend keeps:

    - ``_write`` stores every chunk before the record; when it cannot finish it removes what it
      wrote (best effort) and raises :class:`PartialWriteError`;
    - ``_read_chunks`` yields exactly ``record.chunk_count`` items in index order, None for a
      chunk that is absent;
    - ``_remove`` deletes the record before the chunks.
    """

    def __init__(self, keyring: Keyring, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidRequestError(f"chunk_size {chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} "
                                      f"bytes (256 KiB to 1 MiB)")
        self._keyring = keyring
        self._chunk_size = chunk_size

    # --- the interface ---------------------------------------------------------------------

    def put(self, site_id: str, data: bytes, *, content_type: str = "application/octet-stream",
            attributes: Mapping[str, Any] | None = None, ttl_seconds: int | None = None) -> ImageMetadata:
        """Encrypts and stores an image; returns its metadata, ``image_id`` included.

        ``attributes`` (a JSON-serialisable dict: de-identification summary, dimensions...) is
        stored encrypted. With ``ttl_seconds`` the image expires by itself.
        """
        _check_site(site_id)
        _check_put(data, content_type, ttl_seconds)
        image_id = uuid.uuid4()
        cipher = ImageCipher.generate(image_id=image_id, site_id=site_id)
        chunk_count = -(-len(data) // self._chunk_size)
        created_at = _now_to_the_millisecond()
        metadata = ImageMetadata(
            image_id=image_id, site_id=site_id, content_type=content_type, size=len(data),
            sha256=hashlib.sha256(data).hexdigest(), created_at=created_at, chunk_count=chunk_count,
            key_id=self._keyring.active_key_id, attributes=dict(attributes or {}),
            expires_at=None if ttl_seconds is None else created_at + timedelta(seconds=ttl_seconds))
        wrapped = cipher.wrap(self._keyring)
        record = ImageRecord(site_id, image_id, created_at, chunk_count, wrapped.key_id, wrapped.ciphertext,
                             cipher.seal_metadata(_sealed_document(metadata)), metadata.expires_at)
        self._write(record, self._encrypted_chunks(cipher, data, chunk_count))
        return metadata

    def get(self, site_id: str, image_id: uuid.UUID) -> StoredImage:
        """The image, decrypted and verified (every chunk authenticated, size and sha256 checked)."""
        record = self._require(site_id, image_id)
        cipher = self._cipher(record)
        metadata = _open_metadata(cipher, record)
        try:
            return StoredImage(metadata, _decrypt_chunks(cipher, metadata, self._read_chunks(record)))
        except MissingChunkError:
            # Deleted while it was being read (the record went first): gone, not tampered with.
            if self._read_record(site_id, image_id) is None:
                self._require(site_id, image_id)
            raise

    def metadata(self, site_id: str, image_id: uuid.UUID) -> ImageMetadata:
        """The image's metadata, decrypted, without reading its chunks."""
        record = self._require(site_id, image_id)
        return _open_metadata(self._cipher(record), record)

    def seal_prediction(self, site_id: str, image_id: uuid.UUID, prediction_id: uuid.UUID,
                        document: Mapping[str, Any]) -> bytes:
        """A prediction of the image sealed with the image's data key (ImageNotFoundError if it is gone)."""
        return self._cipher(self._require(site_id, image_id)).seal_prediction(prediction_id, document)

    def open_prediction(self, site_id: str, image_id: uuid.UUID, prediction_id: uuid.UUID,
                        sealed: bytes) -> dict[str, Any]:
        return self._cipher(self._require(site_id, image_id)).open_prediction(prediction_id, sealed)

    def exists(self, site_id: str, image_id: uuid.UUID) -> bool:
        """True when the image is committed at this site (its chunks are not checked)."""
        _check_site(site_id)
        return self._read_record(site_id, image_id) is not None

    def delete(self, site_id: str, image_id: uuid.UUID) -> None:
        """Destroys the image's wrapped data key, then its chunks."""
        self._remove(self._require(site_id, image_id))

    def list_site(self, site_id: str, *, page_size: int = 100, page_token: str | None = None) -> ImagePage:
        """One page of the site's images, in an order that is stable but otherwise unspecified."""
        _check_site(site_id)
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidRequestError(f"page_size {page_size} is outside 1..{MAX_PAGE_SIZE}")
        position = None if page_token is None else _decode_page_token(page_token, site_id)
        records, next_position = self._list_records(site_id, page_size, position)
        images, unreadable = [], []
        for record in records:
            try:
                images.append(_open_metadata(self._cipher(record), record))
            except CryptoError as error:
                # One row wrapped with a lost key, or tampered with, must not hide the site's other images.
                logger.error("image %s of site %s cannot be opened (%s: %s); listed as unreadable",
                             record.image_id, site_id, type(error).__name__, error)
                unreadable.append(record.image_id)
        token = None if next_position is None else _encode_page_token(site_id, next_position)
        return ImagePage(images, token, unreadable)

    def rewrap_keys(self, *, from_key_id: str | None = None) -> int:
        """Re-wraps data keys with the keyring's active key; returns how many were re-wrapped.

        Covers the images whose key is ``from_key_id``, or every key but the active one when
        None. Image ciphertext is untouched. A record deleted or re-wrapped concurrently is
        skipped, and so is one whose key-encryption key was destroyed (``keys retire``: that image
        is already shredded; it is logged by id).
        """
        rewrapped = 0
        for record in self._records_not_wrapped_by(self._keyring.active_key_id):
            if from_key_id is not None and record.key_id != from_key_id:
                continue
            if record.key_id not in self._keyring.key_ids:
                logger.warning("image %s of site %s is wrapped by destroyed key %s: unrecoverable, not re-wrapped",
                               record.image_id, record.site_id, record.key_id)
                continue
            new_key = self._cipher(record).wrap(self._keyring)
            rewrapped += self._replace_key(record, new_key)
        return rewrapped

    def count_unwrappable(self) -> tuple[int, int]:
        """(images whose data key this keyring cannot unwrap, images not wrapped by its active key)."""
        unknown = total = 0
        for record in self._records_not_wrapped_by(self._keyring.active_key_id):
            total += 1
            unknown += record.key_id not in self._keyring.key_ids
        return unknown, total

    def close(self) -> None:
        """Releases connections; the store is unusable afterwards."""

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- what a backend provides -------------------------------------------------------------

    @abstractmethod
    def _write(self, record: ImageRecord, chunks: Iterable[bytes]) -> None:
        """Stores the chunks (index order), then the record, both expiring at ``record.expires_at``."""

    @abstractmethod
    def _read_record(self, site_id: str, image_id: uuid.UUID) -> ImageRecord | None:
        """The committed record, or None."""

    @abstractmethod
    def _read_chunks(self, record: ImageRecord) -> Iterator[bytes | None]:
        """The chunk ciphertexts in index order, None where one is absent."""

    @abstractmethod
    def _remove(self, record: ImageRecord) -> None:
        """Deletes the record, then the chunks."""

    @abstractmethod
    def _list_records(self, site_id: str, page_size: int,
                      position: bytes | None) -> tuple[list[ImageRecord], bytes | None]:
        """Up to ``page_size`` records of the site after ``position``, and the next position."""

    @abstractmethod
    def _records_not_wrapped_by(self, key_id: str) -> Iterator[ImageRecord]:
        """Every committed record whose data key is wrapped by another key than ``key_id``."""

    @abstractmethod
    def _replace_key(self, record: ImageRecord, wrapped: WrappedKey) -> bool:
        """Stores the new wrapped key if the record still holds ``record.key_id``; True if stored."""

    # --- shared steps ------------------------------------------------------------------------

    def _require(self, site_id: str, image_id: uuid.UUID) -> ImageRecord:
        _check_site(site_id)
        record = self._read_record(site_id, image_id)
        if record is None:
            raise ImageNotFoundError(f"no image {image_id} at site '{site_id}'")
        return record

    def _cipher(self, record: ImageRecord) -> ImageCipher:
        return ImageCipher.unwrap(self._keyring, WrappedKey(record.key_id, record.wrapped_key),
                                  image_id=record.image_id, site_id=record.site_id)

    def _encrypted_chunks(self, cipher: ImageCipher, data: bytes, chunk_count: int) -> Iterator[bytes]:
        """Encrypts lazily, so that a backend overlaps encryption with writes in flight."""
        view = memoryview(data)
        for index in range(chunk_count):
            start = index * self._chunk_size
            yield cipher.encrypt_chunk(view[start:start + self._chunk_size], index=index, count=chunk_count)


def _check_site(site_id: str) -> None:
    if not isinstance(site_id, str) or not SITE_ID_PATTERN.fullmatch(site_id):
        raise InvalidRequestError(f"site id {site_id!r} is invalid: 1 to 64 letters, digits, '.', '_' "
                                  f"or '-', starting with a letter or digit")


def _check_put(data: bytes, content_type: str, ttl_seconds: int | None) -> None:
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InvalidRequestError("image data must be non-empty bytes")
    if not content_type or len(content_type) > 255:
        raise InvalidRequestError(f"content_type {content_type!r} must be 1 to 255 characters")
    if ttl_seconds is not None and not 1 <= ttl_seconds <= 630_720_000:
        raise InvalidRequestError(f"ttl_seconds {ttl_seconds} is outside 1..630720000 (20 years)")


def _now_to_the_millisecond() -> datetime:
    """Cassandra timestamps keep milliseconds; so does every backend, for equal round trips."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _sealed_document(metadata: ImageMetadata) -> dict[str, Any]:
    document = {"content_type": metadata.content_type, "size": metadata.size,
                "sha256": metadata.sha256, "attributes": metadata.attributes}
    try:
        json.dumps(document)
    except (TypeError, ValueError) as error:
        raise InvalidRequestError(f"attributes must be a JSON-serialisable dict: {error}") from error
    return document


def _open_metadata(cipher: ImageCipher, record: ImageRecord) -> ImageMetadata:
    document = cipher.open_metadata(record.sealed_metadata)
    return ImageMetadata(
        image_id=record.image_id, site_id=record.site_id, content_type=document["content_type"],
        size=document["size"], sha256=document["sha256"], created_at=record.created_at,
        chunk_count=record.chunk_count, key_id=record.key_id, attributes=document["attributes"],
        expires_at=record.expires_at)


def _decrypt_chunks(cipher: ImageCipher, metadata: ImageMetadata, chunks: Iterator[bytes | None]) -> bytes:
    """All chunks decrypted and joined; raises before returning anything unverified."""
    digest = hashlib.sha256()
    parts = []
    for index, ciphertext in enumerate(chunks):
        if ciphertext is None:
            raise MissingChunkError(f"chunk {index} of {metadata.chunk_count} of image {metadata.image_id} "
                                    f"is missing: it was deleted or lost after the image was committed")
        part = cipher.decrypt_chunk(ciphertext, index=index, count=metadata.chunk_count)
        digest.update(part)
        parts.append(part)
    data = b"".join(parts)
    if len(data) != metadata.size or not hmac.compare_digest(digest.hexdigest(), metadata.sha256):
        raise IntegrityError(f"image {metadata.image_id} decrypted to {len(data)} bytes whose sha256 "
                             f"differs from the {metadata.size} bytes stored")
    return data


def _encode_page_token(site_id: str, position: bytes) -> str:
    """Opaque to callers; names its site so that it cannot page through another one."""
    return base64.urlsafe_b64encode(site_id.encode("ascii") + b"\0" + position).decode("ascii")


def _decode_page_token(token: str, site_id: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raw = b""
    token_site, separator, position = raw.partition(b"\0")
    if not separator or not position or token_site != site_id.encode("ascii"):
        raise InvalidRequestError(f"page token {token[:24]!r} was not issued for site '{site_id}'; "
                                  f"pass back a next_page_token from listing this site")
    return position
