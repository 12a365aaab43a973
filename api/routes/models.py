"""``/v1/models``: the serving variants loaded at start-up, with their metrics from compression."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from api.routes.common import Reader, ServicesDep, errors
from api.routes.predictions import model_version
from api.schemas import ModelInfo, ModelList

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
            metrics=metadata.metrics))
    return ModelList(default=service.models.default, models=models)
