"""Predictions: on a stored image, listed per image, and ``/v1/predict`` (upload, store, predict at once)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Body, Depends, File, Form, Request, UploadFile, status
from starlette.concurrency import run_in_threadpool

from api.routes.common import (
    Reader,
    ServicesDep,
    Uploader,
    errors,
    image_uuid,
    require_multipart,
)
from api.routes.images import store_upload
from api.schemas import (
    Prediction,
    PredictionList,
    PredictionRequest,
    UploadAndPrediction,
)
from api.services import Services
from api.store.base import ImageNotFoundError
from api.store.records import PredictionRecord
from api.uploads import decode_image

router = APIRouter(tags=["predictions"])
TYPE_CLASSES = ("benign", "malignant")


def model_version(service: Services, variant: str) -> str:
    metadata = service.models.model(variant).metadata
    return f"{metadata.source_run.run_id}/{metadata.sha256[:12]}"


async def predict_and_store(service: Services, site_id: str, image_id: uuid.UUID, pixels: np.ndarray,
                            variant: str | None) -> Prediction:
    """Runs the variant on the decoded image and stores the prediction beside it."""
    metadata = service.models.model(variant).metadata
    inference = await service.models.predict(metadata.variant, pixels)
    probabilities = inference.probabilities
    benign, malignant = (probabilities.get(name, 0.0) for name in TYPE_CLASSES)
    prediction = Prediction(
        prediction_id=str(uuid.uuid4()), image_id=str(image_id), variant=metadata.variant, backend=metadata.backend,
        model_version=model_version(service, metadata.variant), probabilities=probabilities,
        predicted_class=max(probabilities, key=probabilities.__getitem__),
        presence={"probability": 1.0 - probabilities.get("normal", 0.0)},
        type={"malignant_given_lesion": (malignant + 1e-6) / (benign + malignant + 2e-6)},
        latency_ms=inference.latency_ms, created_at=datetime.now(timezone.utc))
    record = PredictionRecord(site_id, image_id, uuid.UUID(prediction.prediction_id), prediction.created_at,
                              prediction.model_dump(mode="json"))
    await run_in_threadpool(service.records.add_prediction, record)
    if not await run_in_threadpool(service.images.exists, site_id, image_id):
        # The image was deleted while the model ran: its predictions go with it, none is left orphaned.
        await run_in_threadpool(service.records.delete_predictions, site_id, image_id)
        raise ImageNotFoundError(f"no image {image_id} at site '{site_id}' (deleted while predicting)")
    service.metrics.observe_prediction(metadata.variant, inference.latency_ms / 1000)
    return prediction


@router.post("/images/{image_id}/predictions", status_code=status.HTTP_201_CREATED, response_model=Prediction,
             responses=errors(401, 403, 404, 422, 503), summary="Predict on a stored image with a serving variant")
async def create_prediction(image_id: str, principal: Uploader, service: ServicesDep,
                            request: Annotated[PredictionRequest | None, Body()] = None) -> Prediction:
    image = image_uuid(image_id)
    variant = None if request is None else request.variant
    service.models.model(variant)
    stored = await run_in_threadpool(service.images.get, principal.site_id, image)
    pixels = await run_in_threadpool(decode_image, stored.data, stored.metadata.content_type)
    return await predict_and_store(service, principal.site_id, image, pixels, variant)


@router.get("/images/{image_id}/predictions", response_model=PredictionList, responses=errors(401, 404, 422, 503),
            summary="The image's past predictions, oldest first")
def list_predictions(image_id: str, principal: Reader,
                     service: ServicesDep) -> PredictionList:
    image = image_uuid(image_id)
    service.images.metadata(principal.site_id, image)
    records = service.records.list_predictions(principal.site_id, image)
    return PredictionList(predictions=[Prediction.model_validate(record.document) for record in records])


@router.post("/predict", status_code=status.HTTP_201_CREATED, response_model=UploadAndPrediction,
             dependencies=[Depends(require_multipart)], responses=errors(401, 403, 413, 415, 422, 503),
             summary="Upload, de-identify, store and predict in one call")
async def upload_and_predict(request: Request, file: Annotated[UploadFile, File(description="DICOM Part 10, PNG or JPEG")],
                             principal: Uploader, service: ServicesDep,
                             variant: Annotated[str | None, Form(description="a served variant; absent: the default")]
                             = None) -> UploadAndPrediction:
    service.models.model(variant or None)
    info, clean = await store_upload(request, service, principal, file)
    try:
        prediction = await predict_and_store(service, principal.site_id, uuid.UUID(info.image_id), clean.pixels,
                                             variant or None)
    except Exception:
        await run_in_threadpool(service.images.delete, principal.site_id, uuid.UUID(info.image_id))
        raise
    return UploadAndPrediction(image=info, prediction=prediction)
