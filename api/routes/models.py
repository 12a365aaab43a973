"""``/v1/models``: the serving variants loaded at start-up, with their metrics from compression."""

from __future__ import annotations

from pathlib import Path

from typing import Any

from fastapi import APIRouter, HTTPException, status

from api.routes.common import Reader, ServicesDep, errors
from api.operations import model_version
from api.schemas import ModelCardSummary, ModelInfo, ModelList
from server.model_card import summary

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, responses=errors(401), summary="The serving variants available")
def list_models(principal: Reader, service: ServicesDep) -> ModelList:
    models = []
    for name, model in sorted(service.models.models.items()):
        metadata = model.metadata
        models.append(ModelInfo(
            variant=name, backend=metadata.backend, model_version=model_version(service, name),
            input_size=metadata.preprocessing.image_size,
            size_bytes=(Path(service.settings.model_dir) / name / metadata.model_file).stat().st_size,
            metrics=metadata.metrics, card=_summary(service.models.cards.get(name))))
    return ModelList(default=service.models.default, models=models)


def _summary(card: dict[str, Any] | None) -> ModelCardSummary | None:
    return None if card is None else ModelCardSummary(**summary(card))


@router.get("/models/{variant}/card", responses=errors(401, 404),
            summary="A served variant's whole model card: sites, privacy, audit, utility, provenance")
def model_card(variant: str, principal: Reader, service: ServicesDep) -> dict[str, Any]:
    if variant not in service.models.models:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"variant {variant[:64]!r} is not served; valid: "
                            f"{', '.join(sorted(service.models.models))}")
    card = service.models.cards.get(variant)
    if card is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"variant {variant!r} is served without a model card "
                            "(the service was started with allow_unchecked_models)")
    return card
