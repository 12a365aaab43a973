"""The service's use cases, between the routes (HTTP in, schemas out) and the store and models.

A route parses and authorises; what happens to an image -- de-identified, encrypted, stored,
predicted on, deleted with its predictions -- happens here, the same for every route that does it.
Errors are the domain's (`api.store.base`, `api.uploads`, `api.inference`), mapped to HTTP answers
in one table (`api.app.DOMAIN_ERRORS`). Blocking work runs in the thread pool.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
from starlette.concurrency import run_in_threadpool

from api.schemas import Prediction
from api.services import Services
from api.store.base import ImageMetadata, ImageNotFoundError
from api.store.records import PredictionRecord
from api.uploads import CleanImage, decode_image, render_png

TYPE_CLASSES = ("benign", "malignant")


async def store_upload(service: Services, site_id: str, data: bytes) -> tuple[ImageMetadata, CleanImage]:
    """De-identifies and stores an upload for the site; whole or not at all."""
    clean = await run_in_threadpool(service.deidentifier.clean, data)
    attributes = {"width": clean.width, "height": clean.height, "deidentification": clean.deidentification}
    metadata = await run_in_threadpool(service.images.put, site_id, clean.data,
                                       content_type=clean.content_type, attributes=attributes)
    return metadata, clean


def image_content(service: Services, site_id: str, image_id: uuid.UUID, format: str) -> tuple[bytes, str]:
    """The stored (de-identified) image as stored, or rendered to PNG; (bytes, media type)."""
    stored = service.images.get(site_id, image_id)
    content_type = stored.metadata.content_type
    if format == "png" and content_type != "image/png":
        return render_png(decode_image(stored.data, content_type)), "image/png"
    return stored.data, content_type


def delete_image(service: Services, site_id: str, image_id: uuid.UUID) -> None:
    """Crypto-shreds the image (its data key first), then removes its predictions."""
    service.images.delete(site_id, image_id)
    service.records.delete_predictions(site_id, image_id)


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


async def predict_stored(service: Services, site_id: str, image_id: uuid.UUID, variant: str | None) -> Prediction:
    """A prediction on an image already stored at the site."""
    service.models.model(variant)  # an unknown variant is refused before the image is read
    stored = await run_in_threadpool(service.images.get, site_id, image_id)
    pixels = await run_in_threadpool(decode_image, stored.data, stored.metadata.content_type)
    return await predict_and_store(service, site_id, image_id, pixels, variant)


async def upload_and_predict(service: Services, site_id: str, data: bytes, variant: str | None, *,
                             on_stored: Callable[[uuid.UUID], None] = lambda image_id: None,
                             ) -> tuple[ImageMetadata, Prediction]:
    """Stores the upload and predicts on it; a failed prediction leaves no image behind.

    ``on_stored`` hears the new image's id as soon as it is stored (the audit line names it even
    when the prediction then fails and the image is removed again).
    """
    service.models.model(variant)
    metadata, clean = await store_upload(service, site_id, data)
    on_stored(metadata.image_id)
    try:
        prediction = await predict_and_store(service, site_id, metadata.image_id, clean.pixels, variant)
    except Exception:
        try:
            await run_in_threadpool(delete_image, service, site_id, metadata.image_id)
        except ImageNotFoundError:
            pass  # deleted meanwhile by its site's admin
        raise
    return metadata, prediction


def list_predictions(service: Services, site_id: str, image_id: uuid.UUID) -> list[Prediction]:
    """The image's stored predictions, oldest first (ImageNotFoundError for an image not at the site)."""
    service.images.metadata(site_id, image_id)
    return [Prediction.model_validate(record.document) for record in service.records.list_predictions(site_id, image_id)]
