"""The audit log: who did what to which resource, when, and how it ended; never patient data.

One JSON line per request that reaches a route: time, key id, site, role, action (the route),
resource id (a random image, prediction or key id in canonical form, or none) and HTTP status;
a request that changes something also gets a line with status "started" before it runs (and
is refused, 503, when that line cannot be written: `api.auth.require`).
Image ids are random UUIDs made by the store; nothing read from an image or an upload is ever
written here.

The file is tamper-evident: each line carries ``previous``, the sha256 of the line before it
(64 zeros for the first), so an edited, removed or inserted line breaks the chain at that
point; ``mammofl audit verify FILE`` checks it (`verify_chain`). A chain shows tampering, it
does not prevent it: whoever can rewrite the whole file can rewrite the chain, so ship the
lines (the ``mammofl.audit`` logger) to a store the service cannot write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger("mammofl.audit")
API_PREFIX = "/v1"


GENESIS = "0" * 64


def line_hash(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


class AuditLog:
    """Appends audit lines to a file (when given) and to the ``mammofl.audit`` logger."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._previous = GENESIS
        if path is not None:
            # Who accessed which image is itself sensitive: owner-only folder (when we make it) and file.
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))
            os.chmod(path, 0o600)
            self._previous = _last_hash(path)

    def record(self, *, action: str, status: int | str, key_id: str | None, site_id: str | None,
               role: str | None, resource_id: str | None = None) -> None:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "key_id": key_id,
                 "site_id": site_id, "role": role, "action": action, "resource_id": resource_id, "status": status}
        with self._lock:
            line = json.dumps({**entry, "previous": self._previous}, separators=(",", ":"))
            logger.info(line)
            if self._path is not None:
                with self._path.open("a", encoding="utf-8") as stream:
                    stream.write(line + "\n")
            self._previous = line_hash(line)


def _last_hash(path: Path) -> str:
    """The hash the next line chains to: that of the file's last line (the chain goes on across restarts)."""
    last = None
    with path.open("r", encoding="utf-8") as stream:
        for line in stream:
            if line.strip():
                last = line.rstrip("\n")
    return GENESIS if last is None else line_hash(last)


@dataclass(frozen=True)
class ChainCheck:
    lines: int
    broken_at: int | None  # 1-based line number of the first line whose chain does not hold
    reason: str | None


def verify_chain(path: Path) -> ChainCheck:
    """Walk the audit file: every line must be JSON whose ``previous`` is the hash of the line before."""
    previous, count = GENESIS, 0
    with Path(path).open("r", encoding="utf-8") as stream:
        for count, raw in enumerate(stream, start=1):
            line = raw.rstrip("\n")
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                return ChainCheck(count, count, "not a JSON line")
            if not isinstance(entry, dict) or entry.get("previous") != previous:
                return ChainCheck(count, count, "its 'previous' is not the hash of the line before: a line was "
                                                "edited, removed or inserted here")
            previous = line_hash(line)
    return ChainCheck(count, None, None)


def canonical_resource(parameters: dict[str, str]) -> str | None:
    """The path's resource id as the store names it, never as typed: an image id in canonical UUID
    form, a key id of 16 hex digits; anything else is logged as "invalid" (a URL is not a place
    to write text into the audit trail)."""
    if "image_id" in parameters:
        try:
            return str(uuid.UUID(parameters["image_id"]))
        except ValueError:
            return "invalid"
    if "key_id" in parameters:
        key_id = parameters["key_id"]
        return key_id.lower() if re.fullmatch(r"[0-9a-fA-F]{16}", key_id) else "invalid"
    return None


def route_template(request) -> str:
    """The matched route's path template ("/v1/images/{image_id}"), so that metrics and audit lines
    do not grow per id; "unmatched" before routing or for no route."""
    route = request.scope.get("route")
    template = getattr(route, "path", None)
    if template is None:
        return "unmatched"
    # FastAPI hands over the included router's own route, whose path lacks the router's prefix.
    if request.url.path.startswith(API_PREFIX) and not template.startswith(API_PREFIX):
        return API_PREFIX + template
    return template
