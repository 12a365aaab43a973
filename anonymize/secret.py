"""The de-identification secret: what makes pseudonyms, UIDs and date shifts keyed.

Every site that must produce the same pseudonyms for the same patient shares one secret file;
whoever holds it can re-link pseudonyms to identities, so it lives outside git (``secrets/`` and
``*.key`` are ignored) with mode 0600, and its bytes never reach a log, error or audit line: the
audit names the key by `key_id`, a keyed digest that reveals nothing of it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from common.errors import ConfigError

SECRET_BYTES: Final = 32
MIN_SECRET_BYTES: Final = 16
DEFAULT_SECRET_FILE: Final = Path("secrets/anonymize.key")


def create_secret(path: Path | str) -> Path:
    """Write a new random secret (hex, mode 0600) to `path`; ConfigError when it already exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"secret file {path} already exists; refusing to overwrite the key of existing "
                          "pseudonyms (use it as is, or give a new path)") from exc
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(secrets.token_hex(SECRET_BYTES) + "\n")
    return path


def load_secret(path: Path | str) -> bytes:
    """The secret's bytes; ConfigError when the file is missing, readable by others, or too short."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise ConfigError(f"secret file {path} does not exist; create one with --create-secret "
                          "(or anonymize.secret.create_secret) and share it only between sites") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"secret file {path} is accessible by group or others; run: chmod 600 {path}")
    text = path.read_text(encoding="ascii", errors="strict").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError as exc:
        raise ConfigError(f"secret file {path} must hold hex digits only (as create_secret writes)") from exc
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"secret file {path} holds {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed")
    return secret


def keyed_digest(secret: bytes, purpose: bytes, value: bytes) -> bytes:
    """HMAC-SHA256 of `value` under `secret`, separated per `purpose` so digests never collide across uses."""
    return hmac.new(secret, purpose + b"\0" + value, hashlib.sha256).digest()


def key_id(secret: bytes) -> str:
    """A short public name for the secret: equal secrets have equal ids, the id reveals nothing."""
    return keyed_digest(secret, b"key-id", b"").hex()[:12]
