"""Probes and metrics, without authentication: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse

from api.routes.common import ServicesDep
from api.schemas import Health, Readiness
from api.store.base import StoreError

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}},
            summary="The store answers and the models are loaded")
def readyz(service: ServicesDep) -> Response:
    try:
        service.records.ping()
        store = "ok"
    except StoreError as error:
        store = f"unreachable: {type(error).__name__}"
    models = sorted(service.models.models)
    ready = store == "ok" and bool(models)
    body = Readiness(status="ready" if ready else "not ready", store=store, models=models)
    if ready:
        return JSONResponse(body.model_dump())
    return JSONResponse(body.model_dump(), status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                        headers={"Retry-After": str(service.settings.retry_after_s)})


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(service: ServicesDep) -> Response:
    return Response(service.metrics.exposition(), media_type=service.metrics.content_type)
