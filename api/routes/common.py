"""What every router shares: the services, image ids, error documentation, ImageInfo from metadata."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status

from api.auth import Principal, require
from api.schemas import ErrorBody, ImageInfo
from api.services import Services
from api.store.base import ImageMetadata


def services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]
Reader = Annotated[Principal, Depends(require("reader"))]
Uploader = Annotated[Principal, Depends(require("uploader"))]
Admin = Annotated[Principal, Depends(require("admin"))]


def image_uuid(image_id: str) -> uuid.UUID:
    """The path's image id; a malformed one is as unknown as a missing one (404)."""
    try:
        return uuid.UUID(image_id)
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no image {image_id[:64]!r} at this site") from None


def image_info(metadata: ImageMetadata) -> ImageInfo:
    attributes = metadata.attributes
    return ImageInfo(image_id=str(metadata.image_id), site_id=metadata.site_id, content_type=metadata.content_type,
                     size=metadata.size, created_at=metadata.created_at, width=attributes.get("width"),
                     height=attributes.get("height"), deidentification=attributes.get("deidentification"))


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of the error answers a route may give."""
    meaning = {400: "invalid request", 401: "missing or invalid API key", 403: "the key's role is too weak",
               404: "unknown here (never existed, deleted, or another site's)", 413: "body over the upload limit",
               415: "not multipart/form-data, or not an image", 422: "invalid input, or an image that cannot be "
               "de-identified or decoded", 503: "the store is unreachable (see Retry-After), or not ready"}
    return {code: {"model": ErrorBody, "description": meaning[code]} for code in codes}


def require_multipart(request: Request) -> None:
    """415 unless the body is multipart/form-data (checked before the body's fields are validated)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            detail="expected a multipart/form-data body with the image in the field 'file'")
