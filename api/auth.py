"""API keys, roles and the caller of a request.

A key reads ``mfk_<key_id>_<secret>``. The database keeps the key id (public, it names the key
in the audit log) and the SHA-256 of the secret. The secret is 256 random bits, so a fast hash
is enough (no password-style stretching: nothing guessable to protect, and it is checked on
every request); comparison is constant-time.

Roles are ranked: a *reader* reads its site's images and predictions, an *uploader* also
uploads and predicts, an *admin* also deletes and manages its site's keys.
"""

from __future__ import annotations

import hashlib
import logging
import hmac
import math
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.audit import canonical_resource, route_template
from api.store.base import SITE_ID_PATTERN, StoreError
from api.store.records import ApiKeyRecord, ServiceRecords
from common.errors import MammoflError

Role = Literal["reader", "uploader", "admin"]
ROLE_RANK: dict[str, int] = {"reader": 0, "uploader": 1, "admin": 2}
logger = logging.getLogger(__name__)
KEY_PREFIX = "mfk"
MAX_KEY_DAYS = 3650
TOUCH_INTERVAL = timedelta(minutes=1)
KEY_PATTERN = re.compile(rf"{KEY_PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{43}})")
NAME_PATTERN = re.compile(r"[\w .@()-]{1,64}")


class ApiKeyError(MammoflError):
    """An API key request names an invalid site, role or name."""


class ApiKeyNotFoundError(ApiKeyError):
    """No such API key (never created, revoked, or another site's)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, its site and its role."""

    key_id: str
    site_id: str
    role: Role

    def may(self, role: Role) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


@dataclass(frozen=True)
class IssuedKey:
    """A new key; ``api_key`` is shown once and stored nowhere."""

    record: ApiKeyRecord
    api_key: str


class ApiKeys:
    """Creates, verifies, lists and revokes API keys on the service records."""

    def __init__(self, records: ServiceRecords) -> None:
        self._records = records
        self._touched: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def create(self, site_id: str, role: str, name: str, *, expires_in_days: float | None = None) -> IssuedKey:
        if not SITE_ID_PATTERN.fullmatch(site_id):
            raise ApiKeyError(f"site_id {site_id!r} is invalid: 1 to 64 letters, digits, '.', '_' or '-'")
        if role not in ROLE_RANK:
            raise ApiKeyError(f"role {role!r} is invalid; valid: {', '.join(ROLE_RANK)}")
        if not NAME_PATTERN.fullmatch(name):
            raise ApiKeyError(f"key name {name!r} is invalid: 1 to 64 letters, digits, spaces or . @ ( ) _ -")
        if expires_in_days is not None and not 0 < expires_in_days <= MAX_KEY_DAYS:
            raise ApiKeyError(f"expiry {expires_in_days!r} days is invalid: more than 0 and at most {MAX_KEY_DAYS}")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        now = datetime.now(timezone.utc)
        expires_at = None if expires_in_days is None else now + timedelta(days=expires_in_days)
        record = ApiKeyRecord(key_id, site_id, role, name, _hash(secret), now, expires_at=expires_at)
        self._records.add_key(record)
        return IssuedKey(record, f"{KEY_PREFIX}_{key_id}_{secret}")

    def verify(self, api_key: str) -> Principal | None:
        """The key's principal, or None for a malformed, unknown, revoked or expired key."""
        match = KEY_PATTERN.fullmatch(api_key)
        if match is None:
            return None
        key_id, secret = match.groups()
        record = self._records.get_key(key_id)
        if record is None or not hmac.compare_digest(record.key_hash, _hash(secret)):
            return None
        now = datetime.now(timezone.utc)
        if record.revoked_at is not None or (record.expires_at is not None and now >= record.expires_at):
            return None
        self._touch(record.key_id, now)
        return Principal(record.key_id, record.site_id, record.role)  # type: ignore[arg-type]

    def _touch(self, key_id: str, now: datetime) -> None:
        """Last-used time, written at most once a minute per key (not a write per request)."""
        with self._lock:
            last = self._touched.get(key_id)
            if last is not None and now - last < TOUCH_INTERVAL:
                return
            self._touched[key_id] = now
        try:
            self._records.touch_key(key_id, now)
        except StoreError as error:  # a lost last-used time must not refuse a valid key
            logger.warning("last use of key %s not recorded: %s", key_id, type(error).__name__)

    def list(self, site_id: str | None = None) -> list[ApiKeyRecord]:
        return self._records.list_keys(site_id)

    def revoke(self, key_id: str, *, site_id: str | None = None) -> None:
        """Revokes the key; with ``site_id``, only a key of that site (others are 'unknown')."""
        record = self._records.get_key(key_id)
        if record is None or (site_id is not None and record.site_id != site_id):
            raise ApiKeyNotFoundError(f"no API key {key_id!r}" + (f" at site '{site_id}'" if site_id else ""))
        if record.revoked_at is not None:
            raise ApiKeyNotFoundError(f"API key {key_id!r} was revoked already ({record.revoked_at.isoformat()})")
        self._records.revoke_key(key_id, datetime.now(timezone.utc))


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer mfk_...`")


def unauthorised(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


async def current_principal(request: Request,
                            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    """The caller, from the bearer API key; 401 when it is missing or not a valid key."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise unauthorised("missing API key: send 'Authorization: Bearer <api key>'")
    # A request with a body was verified by the request guard (`api.guard`) before its body was read.
    principal = getattr(request.state, "principal", None) or await run_in_threadpool(
        request.app.state.services.keys.verify, credentials.credentials)
    if principal is None:
        raise unauthorised("invalid API key: unknown, revoked or malformed")
    request.state.principal = principal
    limits = request.app.state.services.key_limits
    wait = limits.take(principal.key_id) if limits is not None else None
    if wait is not None:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail="too many requests with this API key; slow down",
                            headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return principal


CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def require(role: Role):
    """A dependency: the caller, who must hold ``role`` or a stronger one (else 403).

    Before a request that changes something runs, its intent is audited ("status": "started");
    when that line cannot be written the request is refused (503) and nothing is done: no
    change without its audit line. The outcome line follows when the answer is sent.
    """

    async def dependency(request: Request, principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not principal.may(role):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                detail=f"this needs the '{role}' role or stronger; the key's role is '{principal.role}'")
        if request.method in CHANGING_METHODS:
            audit_intent(request, principal)
        return principal

    return dependency


def audit_intent(request: Request, principal: Principal) -> None:
    try:
        request.app.state.services.audit.record(
            action=f"{request.method} {route_template(request)}",
            status="started", key_id=principal.key_id, site_id=principal.site_id, role=principal.role,
            resource_id=canonical_resource(request.path_params))
    except OSError as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            detail="the audit log cannot be written, so nothing was done; retry later "
                                   f"({type(error).__name__})", headers={"Retry-After": "30"}) from None
