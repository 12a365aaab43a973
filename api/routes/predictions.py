"""Predictions: on a stored image, listed per image, and ``/v1/predict`` (upload, store, predict at once)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, File, Form, Request, UploadFile, status

from api import operations
from api.routes.common import (
    Reader,
    ServicesDep,
    Uploader,
    errors,
    image_info,
    image_uuid,
    require_multipart,
)
from api.schemas import (
    Prediction,
    PredictionList,
    PredictionRequest,
    UploadAndPrediction,
)

router = APIRouter(tags=["predictions"])


@router.post("/images/{image_id}/predictions", status_code=status.HTTP_201_CREATED, response_model=Prediction,
             responses=errors(401, 403, 404, 422, 503), summary="Predict on a stored image with a serving variant")
async def create_prediction(image_id: str, principal: Uploader, service: ServicesDep,
                            request: Annotated[PredictionRequest | None, Body()] = None) -> Prediction:
    variant = None if request is None else request.variant
    return await operations.predict_stored(service, principal.site_id, image_uuid(image_id), variant)


@router.get("/images/{image_id}/predictions", response_model=PredictionList, responses=errors(401, 404, 422, 503),
            summary="The image's past predictions, oldest first")
def list_predictions(image_id: str, principal: Reader,
                     service: ServicesDep) -> PredictionList:
    return PredictionList(predictions=operations.list_predictions(service, principal.site_id, image_uuid(image_id)))


@router.post("/predict", status_code=status.HTTP_201_CREATED, response_model=UploadAndPrediction,
             dependencies=[Depends(require_multipart)], responses=errors(401, 403, 413, 415, 422, 503),
             summary="Upload, de-identify, store and predict in one call")
async def upload_and_predict(request: Request, file: Annotated[UploadFile, File(description="DICOM Part 10, PNG or JPEG")],
                             principal: Uploader, service: ServicesDep,
                             variant: Annotated[str | None, Form(description="a served variant; absent: the default")]
                             = None) -> UploadAndPrediction:
    def audited(image_id) -> None:
        request.state.audit_resource = str(image_id)

    metadata, prediction = await operations.upload_and_predict(service, principal.site_id, await file.read(),
                                                               variant or None, on_stored=audited)
    return UploadAndPrediction(image=image_info(metadata), prediction=prediction)
