"""The FastAPI application: ``create_app(settings)`` wires settings, services, routers and error answers.

Every error is JSON ``{"detail": "<message>"}``; no input, however bad, yields a 500: invalid
requests are 4xx, an unreachable store is 503 with Retry-After. Messages never carry patient
data (the store, the de-identifier and the image reader name fields and files, not values).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from api.audit import canonical_resource, route_template
from api.auth import ApiKeyError, ApiKeyNotFoundError
from api.crypto import CryptoError
from api.inference import VariantNotFoundError
from api.routes import health, images, keys, models, predictions
from api.services import Services, open_services
from api.settings import ApiSettings
from api.store.base import ImageNotFoundError, InvalidRequestError, StoreError
from api.guard import AddressRateLimit, RequestGuard
from api.uploads import UploadRejected
from common.errors import DataError, MammoflError

logger = logging.getLogger(__name__)
API_PREFIX = "/v1"


def create_app(settings: ApiSettings, services: Services | None = None) -> FastAPI:
    """The service; stores and models are opened when it starts (lifespan) and closed when it stops.

    ``services`` already opened (``mammofl serve`` opens them first, so that a bad setting is one
    clear error before the server starts) are used as they are, and closed when the app stops.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = services or open_services(settings)
        try:
            yield
        finally:
            app.state.services.close()

    # Swagger UI and ReDoc load their scripts from a CDN, on the origin whose sessionStorage holds the
    # web front end's API key: off unless asked for (the OpenAPI document itself stays at /openapi.json).
    docs = {} if settings.docs_enabled else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="mammofl inference service", version="1", lifespan=lifespan, **docs,
                  description="De-identified, encrypted mammogram storage and classification "
                              "(normal / benign / malignant), per site, behind API keys.")
    for router in (keys.router, images.router, predictions.router, models.router):
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(health.router)
    _add_error_answers(app, settings)
    app.add_middleware(RequestGuard, max_bytes=settings.max_upload_bytes, max_json_bytes=settings.max_json_bytes,
                       idle_timeout_s=settings.body_idle_timeout_s, total_timeout_s=settings.body_total_timeout_s,
                       max_concurrent=settings.max_concurrent_uploads, retry_after_s=settings.retry_after_s)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(AddressRateLimit, per_minute=settings.rate_limit_per_address)
    app.middleware("http")(_observe)
    if settings.tls:
        app.middleware("http")(_strict_transport)
    if settings.web_dir is not None and settings.web_dir.is_dir():
        app.mount("/", StaticFiles(directory=settings.web_dir, html=True), name="web")
    return app


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Our own scripts and styles only; no framing by anyone (clickjacking of a signed-in key).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
}
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


async def _observe(request: Request, call_next) -> Response:
    """Metrics for every request; an audit line for every /v1 request (who, what, which id, outcome)."""
    started = time.perf_counter()
    try:
        response = await call_next(request)
    except Exception:
        # An unhandled error is answered 500 by the server; it still gets its metric and audit line.
        _account(request, 500, started)
        raise
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.url.path.startswith(API_PREFIX):
        # Images, predictions and freshly issued keys are never to be kept by a browser or proxy cache.
        response.headers["Cache-Control"] = "no-store"
    _account(request, response.status_code, started)
    return response


async def _strict_transport(request: Request, call_next) -> Response:
    """Over HTTPS: browsers are to use nothing else for this host for a year."""
    response = await call_next(request)
    response.headers["Strict-Transport-Security"] = "max-age=31536000"
    return response


def _account(request: Request, status_code: int, started: float) -> None:
    template = route_template(request)
    services = getattr(request.app.state, "services", None)
    if services is None:
        return
    # Anyone can invent a method: an unknown one shares a label, so the metrics cannot be grown at will.
    method = request.method if request.method in KNOWN_METHODS else "OTHER"
    services.metrics.observe_request(method, template, status_code, time.perf_counter() - started)
    if request.url.path.startswith(API_PREFIX):
        principal = getattr(request.state, "principal", None)
        parameters = request.scope.get("path_params", {})
        resource = getattr(request.state, "audit_resource", None) or canonical_resource(parameters)
        try:
            services.audit.record(action=f"{method} {template}", status=status_code,
                                  key_id=getattr(principal, "key_id", None), site_id=getattr(principal, "site_id", None),
                                  role=getattr(principal, "role", None), resource_id=resource)
        except OSError as error:
            # The change itself was audited ("started") before it ran; its outcome line is lost.
            logger.error("audit outcome line of %s %s could not be written: %s", method, template, error)




@dataclass(frozen=True)
class ErrorAnswer:
    """How a domain error is answered: its status (None: the error's own ``status_code``), whether
    the client is told when to retry, and what is logged (the error's type only, never its text)."""

    status: int | None
    retry: bool = False
    log_level: int | None = None
    detail: Callable[[Exception], str] = str


def _store_detail(error: Exception) -> str:
    return f"the image store is unavailable, nothing was changed by a failed write; retry later ({type(error).__name__})"


def _crypto_detail(error: Exception) -> str:
    return f"a stored image failed its integrity check or its key is missing ({type(error).__name__})"


def _internal_detail(error: Exception) -> str:
    return f"the service failed ({type(error).__name__}); nothing was changed"


# Every error the domain raises, and its answer. A handler is looked up along the error's class
# hierarchy, so the most specific entry wins (ImageNotFoundError is a StoreError, 404 not 503).
DOMAIN_ERRORS: dict[type[Exception], ErrorAnswer] = {
    UploadRejected: ErrorAnswer(None),
    ImageNotFoundError: ErrorAnswer(status.HTTP_404_NOT_FOUND),
    InvalidRequestError: ErrorAnswer(status.HTTP_400_BAD_REQUEST),
    StoreError: ErrorAnswer(status.HTTP_503_SERVICE_UNAVAILABLE, retry=True, log_level=logging.WARNING,
                            detail=_store_detail),
    ApiKeyNotFoundError: ErrorAnswer(status.HTTP_404_NOT_FOUND),
    ApiKeyError: ErrorAnswer(status.HTTP_422_UNPROCESSABLE_CONTENT),
    VariantNotFoundError: ErrorAnswer(status.HTTP_422_UNPROCESSABLE_CONTENT),
    DataError: ErrorAnswer(status.HTTP_422_UNPROCESSABLE_CONTENT),
    CryptoError: ErrorAnswer(status.HTTP_500_INTERNAL_SERVER_ERROR, log_level=logging.ERROR, detail=_crypto_detail),
    MammoflError: ErrorAnswer(status.HTTP_500_INTERNAL_SERVER_ERROR, log_level=logging.ERROR,
                              detail=_internal_detail),
}


def _add_error_answers(app: FastAPI, settings: ApiSettings) -> None:
    retry = {"Retry-After": str(settings.retry_after_s)}

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(error)}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    def handler(answer: ErrorAnswer):
        async def answer_error(request: Request, error: Exception) -> JSONResponse:
            if answer.log_level is not None:
                logger.log(answer.log_level, "%s %s answered with %s", request.method, route_template(request),
                           type(error).__name__)
            code = answer.status if answer.status is not None else error.status_code  # type: ignore[attr-defined]
            return JSONResponse({"detail": answer.detail(error)}, status_code=code,
                                headers=retry if answer.retry else None)

        return answer_error

    for error_type, answer in DOMAIN_ERRORS.items():
        app.add_exception_handler(error_type, handler(answer))


def validation_message(error: RequestValidationError) -> str:
    """One sentence per invalid field: where, and what was wrong (input values left out)."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()))
        message = "the body is not valid JSON" if item.get("type") == "json_invalid" else item.get("msg", "invalid")
        parts.append(f"{where}: {message}")
    return "; ".join(parts) or "invalid request"
