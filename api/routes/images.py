"""``/v1/images``: upload (de-identify, encrypt, store), list, read, render and delete a site's images."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import (
    APIRouter,
    Depends,
    File,
    Query,
    Request,
    Response,
    UploadFile,
    status,
)
from api import operations
from api.routes.common import (
    Admin,
    Reader,
    ServicesDep,
    Uploader,
    errors,
    image_info,
    image_uuid,
    require_multipart,
)
from api.schemas import ImageInfo, ImageList
from api.store.base import MAX_PAGE_SIZE

router = APIRouter(prefix="/images", tags=["images"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ImageInfo,
             dependencies=[Depends(require_multipart)], responses=errors(401, 403, 413, 415, 422, 503),
             summary="Upload a mammogram (DICOM, PNG or JPEG): de-identified, encrypted, stored")
async def upload_image(request: Request, file: Annotated[UploadFile, File(description="DICOM Part 10, PNG or JPEG")],
                       principal: Uploader,
                       service: ServicesDep) -> ImageInfo:
    metadata, _ = await operations.store_upload(service, principal.site_id, await file.read())
    request.state.audit_resource = str(metadata.image_id)
    return image_info(metadata)


@router.get("", response_model=ImageList, responses=errors(400, 401, 422, 503), summary="List the site's images, paged")
def list_images(principal: Reader, service: ServicesDep,
                page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
                page_token: Annotated[str | None, Query(max_length=4096,
                                                        description="next_page_token of the last page")] = None,
                ) -> ImageList:
    page = service.images.list_site(principal.site_id, page_size=page_size, page_token=page_token)
    return ImageList(images=[image_info(metadata) for metadata in page.images], next_page_token=page.next_page_token,
                     unreadable=[str(image_id) for image_id in page.unreadable])


@router.get("/{image_id}", response_model=ImageInfo, responses=errors(401, 404, 422, 503), summary="An image's metadata")
def get_image(image_id: str, principal: Reader,
              service: ServicesDep) -> ImageInfo:
    return image_info(service.images.metadata(principal.site_id, image_uuid(image_id)))


@router.get("/{image_id}/content", responses={200: {"content": {"application/dicom": {}, "image/png": {}},
                                                    "description": "the de-identified image"},
                                              **errors(401, 404, 422, 503)},
            response_class=Response, summary="The de-identified image, as stored or rendered to PNG")
def get_image_content(image_id: str, principal: Reader, service: ServicesDep,
                      format: Literal["original", "png"] = "original") -> Response:
    data, media_type = operations.image_content(service, principal.site_id, image_uuid(image_id), format)
    return Response(data, media_type=media_type)


@router.delete("/{image_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses=errors(401, 403, 404, 422, 503), summary="Delete an image (crypto-shredded) and its predictions")
def delete_image(image_id: str, principal: Admin,
                 service: ServicesDep) -> Response:
    operations.delete_image(service, principal.site_id, image_uuid(image_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
