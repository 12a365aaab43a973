"""Envelope encryption of stored mammograms, and the keyring of key-encryption keys.

Every image gets a fresh 256-bit data key. The data key encrypts the image's chunks and its
sealed metadata with AES-256-GCM; the database keeps the data key only wrapped (AES-256-GCM as
well) by a key-encryption key named by ``key_id``. Key-encryption keys never reach the database:
they live in a keyring file (JSON, mode 0600, outside git) or in the ``MAMMOFL_KEYRING``
environment variable (the same JSON, base64-encoded).

Associated data binds each ciphertext to its place: a chunk to its image id, site, index and the
image's chunk count; the sealed metadata and the wrapped data key to their image id and site.
A chunk swapped between images, moved to another index, cut off or altered therefore fails to
decrypt, and the failure is reported as :class:`IntegrityError`.

Rotation adds a new active key-encryption key (:func:`rotate_key`); the stores re-wrap data keys
with it (``ImageStore.rewrap_keys``) without touching the image ciphertext; :func:`retire_key`
then destroys the old key, which also makes every copy of a data key still wrapped by it (in
backups, in SSTables awaiting compaction) useless.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import stat
import threading
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.errors import MammoflError

logger = logging.getLogger(__name__)
KEYRING_ENV = "MAMMOFL_KEYRING"
KEYRING_FORMAT = "mammofl-keyring/1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
# Per-ciphertext overhead: a random nonce in front, the GCM tag behind.
CIPHERTEXT_OVERHEAD = NONCE_BYTES + TAG_BYTES


class CryptoError(MammoflError):
    """Encryption, decryption or key management failed."""


class KeyringError(CryptoError):
    """A keyring file or the keyring environment variable cannot be used as given."""


class WrongKeyError(CryptoError):
    """A data key cannot be unwrapped: its key-encryption key is absent or not the one that wrapped it."""


class IntegrityError(CryptoError):
    """Stored ciphertext failed authentication or verification: altered, swapped, cut off or missing."""


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key-encryption key: never its material."""

    key_id: str
    created_at: datetime
    active: bool


@dataclass(frozen=True)
class Keyring:
    """Key-encryption keys by id, one of them active (the one new data keys are wrapped with)."""

    active_key_id: str
    _material: Mapping[str, bytes] = field(repr=False)
    _created: Mapping[str, datetime] = field(repr=False)

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        """Reads a keyring file; refuses one that the group or others may read or write."""
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise KeyringError(f"keyring {path} cannot be read ({error.strerror}); "
                               f"create one with `mammofl keys create`") from error
        if mode & 0o077:
            raise KeyringError(f"keyring {path} has mode {mode:04o}: group or others may access it; "
                               f"only its owner may (chmod 600 {path})")
        return cls._from_json(text, source=str(path))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Keyring:
        """Reads the keyring from ``MAMMOFL_KEYRING``: the keyring file's JSON, base64-encoded."""
        encoded = environ.get(KEYRING_ENV)
        if not encoded:
            raise KeyringError(f"environment variable {KEYRING_ENV} is not set; it should hold "
                               f"a keyring file's JSON, base64-encoded")
        try:
            text = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as error:
            raise KeyringError(f"environment variable {KEYRING_ENV} is not base64 of a keyring's "
                               f"JSON (encode one with: base64 -w0 keyring.json)") from error
        return cls._from_json(text, source=f"${KEYRING_ENV}")

    @classmethod
    def _from_json(cls, text: str, *, source: str) -> Keyring:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise KeyringError(f"keyring {source} is not JSON: {error.msg} at line {error.lineno}") from error
        return _keyring_from_document(document, source=source)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._material)

    def material(self, key_id: str) -> bytes:
        """The key-encryption key named ``key_id``; :class:`WrongKeyError` when the keyring lacks it."""
        try:
            return self._material[key_id]
        except KeyError:
            raise WrongKeyError(f"key-encryption key '{key_id}' is not in the keyring, which holds "
                                f"{', '.join(sorted(self._material))}") from None

    def describe(self) -> list[KeyInfo]:
        """The keys, oldest first, without their material."""
        infos = [KeyInfo(key_id, self._created[key_id], key_id == self.active_key_id)
                 for key_id in self._material]
        return sorted(infos, key=lambda info: (info.created_at, info.key_id))

    @classmethod
    def generate(cls) -> Keyring:
        """A keyring holding one new key, active."""
        key_id, material, created = _generate_key()
        return cls(key_id, {key_id: material}, {key_id: created})

    def rotated(self) -> Keyring:
        """This keyring plus a new key, which becomes the active one."""
        key_id, material, created = _generate_key()
        return Keyring(key_id, {**self._material, key_id: material}, {**self._created, key_id: created})

    def without(self, key_id: str) -> Keyring:
        """This keyring less ``key_id``, which must exist and must not be active."""
        self.material(key_id)
        if key_id == self.active_key_id:
            raise KeyringError(f"key '{key_id}' is the active key; rotate to a new key before retiring it")
        return Keyring(self.active_key_id,
                       {kid: key for kid, key in self._material.items() if kid != key_id},
                       {kid: when for kid, when in self._created.items() if kid != key_id})


def _generate_key() -> tuple[str, bytes, datetime]:
    now = datetime.now(timezone.utc)
    return f"kek-{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}", AESGCM.generate_key(bit_length=8 * KEY_BYTES), now


def _keyring_from_document(document: Any, *, source: str) -> Keyring:
    if not isinstance(document, dict) or document.get("format") != KEYRING_FORMAT:
        raise KeyringError(f"keyring {source} lacks \"format\": \"{KEYRING_FORMAT}\"")
    entries = document.get("keys")
    if not isinstance(entries, dict) or not entries:
        raise KeyringError(f"keyring {source}: \"keys\" must map key ids to keys and hold at least one")
    material, created = {}, {}
    for key_id, entry in entries.items():
        material[key_id], created[key_id] = _entry_from_document(entry, key_id=key_id, source=source)
    active = document.get("active")
    if active not in material:
        raise KeyringError(f"keyring {source}: \"active\" is {active!r}, which is not one of its keys "
                           f"({', '.join(sorted(material))})")
    return Keyring(active, material, created)


def _entry_from_document(entry: Any, *, key_id: str, source: str) -> tuple[bytes, datetime]:
    try:
        material = base64.b64decode(entry["material"], validate=True)
        created = datetime.fromisoformat(entry["created_at"])
    except (TypeError, KeyError, ValueError, binascii.Error) as error:
        raise KeyringError(f"keyring {source}: key '{key_id}' needs \"material\" (base64) and "
                           f"\"created_at\" (ISO 8601)") from error
    if created.tzinfo is None:
        raise KeyringError(f"keyring {source}: key '{key_id}' has a \"created_at\" without a time zone")
    if len(material) != KEY_BYTES:
        raise KeyringError(f"keyring {source}: key '{key_id}' is {len(material)} bytes; "
                           f"AES-256 keys are {KEY_BYTES}")
    return material, created


def _document_from_keyring(keyring: Keyring) -> dict[str, Any]:
    keys = {info.key_id: {"material": base64.b64encode(keyring.material(info.key_id)).decode("ascii"),
                          "created_at": info.created_at.isoformat()}
            for info in keyring.describe()}
    return {"format": KEYRING_FORMAT, "active": keyring.active_key_id, "keys": keys}


def _write_keyring(path: Path, keyring: Keyring) -> None:
    """Writes the keyring atomically (temporary file, then rename), readable by its owner only.

    The file it replaces is then overwritten with zeros: a retired key's material must not stay
    in freed disk blocks (on a copy-on-write file system or an SSD that is not guaranteed; such
    disks need full-disk encryption for a key's destruction to be final).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".keyring-", dir=path.parent)  # created 0600
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            json.dump(_document_from_keyring(keyring), stream, indent=2)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        replaced = _open_existing(path)
        try:
            os.replace(temporary, path)
            _fsync_directory(path.parent)
            if replaced is not None:
                _overwrite_with_zeros(replaced)
        finally:
            if replaced is not None:
                os.close(replaced)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _open_existing(path: Path) -> int | None:
    try:
        return os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return None


def _overwrite_with_zeros(descriptor: int) -> None:
    size = os.fstat(descriptor).st_size
    os.pwrite(descriptor, bytes(size), 0)
    os.fsync(descriptor)


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def create_key(keyring_path: Path) -> str:
    """Creates a keyring file holding one new, active key-encryption key; returns its id.

    Refuses to touch an existing keyring: adding a key to one is :func:`rotate_key`.
    """
    if keyring_path.exists():
        raise KeyringError(f"keyring {keyring_path} already exists; add a key to it with "
                           f"`mammofl keys rotate`")
    keyring = Keyring.generate()
    _write_keyring(keyring_path, keyring)
    return keyring.active_key_id


def rotate_key(keyring_path: Path) -> str:
    """Adds a new key-encryption key and makes it active; returns its id.

    The old keys stay, so existing images remain readable until the store re-wraps their data
    keys (``ImageStore.rewrap_keys``) and :func:`retire_key` removes the old key.
    """
    keyring = Keyring.from_file(keyring_path).rotated()
    _write_keyring(keyring_path, keyring)
    return keyring.active_key_id


def retire_key(keyring_path: Path, key_id: str) -> None:
    """Destroys a key-encryption key that is no longer active.

    Every data key still wrapped by it becomes unrecoverable: re-wrap first, unless shredding
    those images is the point.
    """
    _write_keyring(keyring_path, Keyring.from_file(keyring_path).without(key_id))


def list_keys(keyring_path: Path) -> list[KeyInfo]:
    """The keyring's keys, oldest first, without their material."""
    return Keyring.from_file(keyring_path).describe()


def load_keyring(keyring_path: Path | None, *, follow: bool = False) -> Keyring | FileKeyring:
    """The keyring from ``MAMMOFL_KEYRING`` when that is set, else from ``keyring_path``.

    With `follow` (the running service) a file keyring is re-read whenever the file changes, so
    that ``mammofl keys rotate`` takes effect while the service runs.
    """
    if os.environ.get(KEYRING_ENV):
        return Keyring.from_env()
    if keyring_path is None:
        raise KeyringError(f"no keyring: set {KEYRING_ENV} or name a keyring file "
                           f"(create one with `mammofl keys create`)")
    return FileKeyring(keyring_path) if follow else Keyring.from_file(keyring_path)


class FileKeyring:
    """A keyring file followed while a service runs: every use checks the file and re-reads it if it changed.

    ``mammofl keys rotate`` writes the file atomically (a new inode), so a stat per use sees a
    rotation at once: new data keys are wrapped with the new active key, images re-wrapped with
    it open, and a retired key is gone. A file that cannot be read keeps the last good keyring
    (logged), so a botched edit does not take the service down.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._current = Keyring.from_file(self._path)
        self._signature = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            info = self._path.stat()
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns, info.st_size

    @property
    def current(self) -> Keyring:
        signature = self._stat()
        if signature is not None and signature != self._signature:
            with self._lock:
                if signature != self._signature:
                    try:
                        self._current = Keyring.from_file(self._path)
                        logger.info("keyring %s re-read: active key %s", self._path, self._current.active_key_id)
                    except KeyringError as error:
                        logger.error("keyring %s changed but cannot be read (%s); keeping the last good one",
                                     self._path, error)
                    self._signature = signature
        return self._current

    @property
    def active_key_id(self) -> str:
        return self.current.active_key_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        return self.current.key_ids

    def material(self, key_id: str) -> bytes:
        return self.current.material(key_id)

    def describe(self) -> list[KeyInfo]:
        return self.current.describe()


def _associated_data(*fields: str | bytes | int) -> bytes:
    """An unambiguous encoding of where a ciphertext belongs: typed, length-prefixed fields."""
    parts = [b"mammofl-aad/1"]
    for value in fields:
        if isinstance(value, int):
            parts.append(b"i" + struct.pack(">Q", value))
        else:
            raw = value.encode("utf-8") if isinstance(value, str) else value
            parts.append(b"b" + struct.pack(">I", len(raw)) + raw)
    return b"".join(parts)


def _seal(aead: AESGCM, plaintext: bytes | memoryview, associated_data: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + aead.encrypt(nonce, plaintext, associated_data)


def _open(aead: AESGCM, sealed: bytes, associated_data: bytes) -> bytes:
    """Raises InvalidTag when ``sealed`` is not what :func:`_seal` made for this associated data."""
    if len(sealed) < CIPHERTEXT_OVERHEAD:
        raise InvalidTag()
    return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)


@dataclass(frozen=True)
class WrappedKey:
    """A data key as the database keeps it: encrypted by the key-encryption key ``key_id``."""

    key_id: str
    ciphertext: bytes


class ImageCipher:
    """Encrypts and decrypts one image's chunks and metadata with its data key."""

    def __init__(self, data_key: bytes, *, image_id: UUID, site_id: str) -> None:
        self._aead = AESGCM(data_key)
        self._data_key = data_key
        self.image_id = image_id
        self.site_id = site_id

    @classmethod
    def generate(cls, *, image_id: UUID, site_id: str) -> ImageCipher:
        """A cipher with a fresh random data key, for a new image."""
        return cls(AESGCM.generate_key(bit_length=8 * KEY_BYTES), image_id=image_id, site_id=site_id)

    @classmethod
    def unwrap(cls, keyring: Keyring, wrapped: WrappedKey, *, image_id: UUID, site_id: str) -> ImageCipher:
        """The cipher of a stored image; :class:`WrongKeyError` when its data key cannot be unwrapped."""
        aead = AESGCM(keyring.material(wrapped.key_id))
        try:
            data_key = _open(aead, wrapped.ciphertext, _key_wrap_data(wrapped.key_id, image_id, site_id))
        except InvalidTag:
            raise WrongKeyError(
                f"the data key of image {image_id} does not unwrap with key-encryption key "
                f"'{wrapped.key_id}': the keyring holds a different key under that id, or the "
                f"wrapped key was altered") from None
        return cls(data_key, image_id=image_id, site_id=site_id)

    def wrap(self, keyring: Keyring) -> WrappedKey:
        """The data key wrapped by the keyring's active key-encryption key."""
        key_id = keyring.active_key_id
        aead = AESGCM(keyring.material(key_id))
        return WrappedKey(key_id, _seal(aead, self._data_key, _key_wrap_data(key_id, self.image_id, self.site_id)))

    def encrypt_chunk(self, plaintext: bytes | memoryview, *, index: int, count: int) -> bytes:
        return _seal(self._aead, plaintext, self._chunk_data(index, count))

    def decrypt_chunk(self, ciphertext: bytes, *, index: int, count: int) -> bytes:
        try:
            return _open(self._aead, ciphertext, self._chunk_data(index, count))
        except InvalidTag:
            raise IntegrityError(
                f"chunk {index} of {count} of image {self.image_id} failed authentication: it was "
                f"altered, cut off, or belongs to another image or position") from None

    def seal_metadata(self, document: Mapping[str, Any]) -> bytes:
        plaintext = json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")
        return _seal(self._aead, plaintext, self._metadata_data())

    def open_metadata(self, sealed: bytes) -> dict[str, Any]:
        try:
            return json.loads(_open(self._aead, sealed, self._metadata_data()))
        except InvalidTag:
            raise IntegrityError(f"the sealed metadata of image {self.image_id} failed authentication: "
                                 f"it was altered or belongs to another image") from None

    def seal_prediction(self, prediction_id: UUID, document: Mapping[str, Any]) -> bytes:
        """A prediction of this image, sealed with its data key: gone with the image's key (crypto-shredded)."""
        plaintext = json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")
        return _seal(self._aead, plaintext, self._prediction_data(prediction_id))

    def open_prediction(self, prediction_id: UUID, sealed: bytes) -> dict[str, Any]:
        try:
            return json.loads(_open(self._aead, sealed, self._prediction_data(prediction_id)))
        except InvalidTag:
            raise IntegrityError(f"prediction {prediction_id} of image {self.image_id} failed authentication: "
                                 f"it was altered or belongs to another image") from None

    def _prediction_data(self, prediction_id: UUID) -> bytes:
        return _associated_data("prediction", self.image_id.bytes, self.site_id, prediction_id.bytes)

    def _chunk_data(self, index: int, count: int) -> bytes:
        return _associated_data("chunk", self.image_id.bytes, self.site_id, index, count)

    def _metadata_data(self) -> bytes:
        return _associated_data("metadata", self.image_id.bytes, self.site_id)


def _key_wrap_data(key_id: str, image_id: UUID, site_id: str) -> bytes:
    return _associated_data("data-key", key_id, image_id.bytes, site_id)
