"""What a request must pass before the service reads its body.

- **Who first.** A ``/v1`` request's API key is checked before a byte of its body is read: an
  anonymous 60 MB body is answered 401 at once, not read into memory first.
- **How much.** A body over ``max_upload_bytes`` is 413 (from Content-Length at once, else
  while streaming); a JSON body (keys, prediction requests) over ``max_json_bytes`` too.
- **How slowly.** A body that stalls longer than ``body_idle_timeout_s`` between two chunks,
  or takes longer than ``body_total_timeout_s`` in all, is 408: a slow client cannot hold a
  connection and a worker for minutes.
- **How many at once.** At most ``max_concurrent_uploads`` bodies are read at a time; the next
  is 503 with Retry-After rather than queued in memory.
- **How often.** ``rate_limit_per_address`` requests a minute per client address (before the
  key is even checked) and ``rate_limit_per_key`` per API key (after it is verified: a key id
  is public, so an unverified one must not spend its holder's allowance); beyond, 429 with
  Retry-After. Behind a proxy every client shares the proxy's address: raise or disable
  (0) the per-address limit there.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import OrderedDict

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.store.base import StoreError

API_PREFIX = "/v1"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyRefused(HTTPException):
    """Raised while a body streams in; an HTTPException so that body parsing lets it through."""


def too_large_message(max_bytes: int) -> str:
    return f"the request body is over the limit of {max_bytes} bytes for this kind of request"


class RequestGuard:
    """ASGI middleware: authenticate, then bound the body's size, pace and concurrency."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_json_bytes: int, idle_timeout_s: float,
                 total_timeout_s: float, max_concurrent: int, retry_after_s: int) -> None:
        self.app = app
        self.max_bytes, self.max_json_bytes = max_bytes, max_json_bytes
        self.idle_timeout_s, self.total_timeout_s = idle_timeout_s, total_timeout_s
        self.retry_after_s = retry_after_s
        self._slots = max_concurrent
        self._in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if scope["path"].startswith(API_PREFIX):
            try:
                authenticated = await self._authenticated(scope, headers)
            except StoreError as error:
                # Outside FastAPI's handlers: answered here as the app answers an unreachable store.
                await _answer(send, 503, f"the image store is unavailable, nothing was changed; retry later "
                                         f"({type(error).__name__})",
                              [(b"retry-after", str(self.retry_after_s).encode())])
                return
            if not authenticated:
                await _answer(send, 401, "missing or invalid API key: send 'Authorization: Bearer <api key>' (the "
                                         "body was not read)", [(b"www-authenticate", b"Bearer")])
                return
        json_body = headers.get(b"content-type", b"").split(b";")[0].strip().lower() == b"application/json"
        limit = self.max_json_bytes if json_body else self.max_bytes
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _answer(send, 413, too_large_message(limit))
            return
        if self._in_flight >= self._slots:
            await _answer(send, 503, f"the service is reading {self._slots} upload(s) already; retry shortly",
                          [(b"retry-after", str(self.retry_after_s).encode())])
            return
        self._in_flight += 1
        try:
            await self.app(scope, self._paced(receive, limit), send)
        finally:
            self._in_flight -= 1

    async def _authenticated(self, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        services = getattr(scope["app"].state, "services", None)
        if scheme.lower() != "bearer" or not key or services is None:
            return False
        principal = await run_in_threadpool(services.keys.verify, key.strip())
        if principal is None:
            return False
        # Known from here on: a body refused later (413, 408, 422) is audited under its key.
        scope.setdefault("state", {})["principal"] = principal
        return True

    def _paced(self, receive: Receive, limit: int) -> Receive:
        seen, started, complete = 0, time.monotonic(), False

        async def paced_receive() -> Message:
            nonlocal seen, complete
            if complete:  # the body is in; what follows is the wait for a disconnect
                return await receive()
            left = self.total_timeout_s - (time.monotonic() - started)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.idle_timeout_s, left)))
            except asyncio.TimeoutError:
                raise BodyRefused(408, detail=f"the request body arrived too slowly (limits: "
                                              f"{self.idle_timeout_s:g} s between chunks, {self.total_timeout_s:g} s "
                                              "in all)") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyRefused(413, detail=too_large_message(limit))
                complete = not message.get("more_body", False)
            return message

        return paced_receive


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class TokenBuckets:
    """Per-name token buckets: `per_minute` requests a minute, bursts of up to a tenth of a minute's.

    Bounded in memory: the least recently seen names are forgotten beyond `max_names`.
    """

    def __init__(self, per_minute: int, *, max_names: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(10.0, per_minute / 6.0)
        self.max_names = max_names
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, name: str) -> float | None:
        """None when the request may go, else the seconds until it could."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(name, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[name] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self.max_names:
                self._buckets.popitem(last=False)
        return None if allowed else (1.0 - tokens) / self.rate


class AddressRateLimit:
    """ASGI middleware: ``/v1`` requests per client address, before anything else is done (429)."""

    def __init__(self, app: ASGIApp, *, per_minute: int) -> None:
        self.app = app
        self.buckets = TokenBuckets(per_minute) if per_minute > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.buckets is not None and scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            address = (scope.get("client") or ("unknown", 0))[0]
            wait = self.buckets.take(address)
            if wait is not None:
                await _answer(send, 429, "too many requests from this address; slow down",
                              [(b"retry-after", str(max(1, math.ceil(wait))).encode())])
                return
        await self.app(scope, receive, send)
