"""The audit log: who did what to which resource, when, and how it ended; never patient data.

One JSON line per request that reaches a route: time, key id, site, role, action (the route),
resource id (a random image, prediction or key id, or none) and HTTP status. Image ids are
random UUIDs made by the store; nothing read from an image or an upload is ever written here.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger("mammofl.audit")


class AuditLog:
    """Appends audit lines to a file (when given) and to the ``mammofl.audit`` logger."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, *, action: str, status: int, key_id: str | None, site_id: str | None,
               role: str | None, resource_id: str | None = None) -> None:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "key_id": key_id,
                 "site_id": site_id, "role": role, "action": action, "resource_id": resource_id, "status": status}
        line = json.dumps(entry, separators=(",", ":"))
        logger.info(line)
        if self._path is not None:
            with self._lock, self._path.open("a", encoding="utf-8") as stream:
                stream.write(line + "\n")
