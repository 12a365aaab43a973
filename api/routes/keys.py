"""``/v1/whoami`` and ``/v1/keys``: the caller's key, and an admin's management of its site's keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status

from api.auth import Principal, current_principal
from api.routes.common import Admin, ServicesDep, errors
from api.schemas import IssuedKey, KeyInfo, KeyList, KeyRequest, Whoami

router = APIRouter(tags=["keys"])


@router.get("/whoami", response_model=Whoami, responses=errors(401), summary="The calling key's id, site and role")
def whoami(principal: Annotated[Principal, Depends(current_principal)]) -> Whoami:
    return Whoami(key_id=principal.key_id, site_id=principal.site_id, role=principal.role)


@router.post("/keys", status_code=status.HTTP_201_CREATED, response_model=IssuedKey,
             responses=errors(401, 403, 422, 503), summary="Issue an API key for the admin's site (shown once)")
def create_key(body: KeyRequest, request: Request, principal: Admin,
               service: ServicesDep) -> IssuedKey:
    if body.site_id != principal.site_id:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            detail=f"an admin key of site '{principal.site_id}' issues keys for that site only; "
                                   f"use `mammofl api-keys create` for another site")
    issued = service.keys.create(body.site_id, body.role, body.name, expires_in_days=body.expires_in_days)
    request.state.audit_resource = issued.record.key_id
    record = issued.record
    return IssuedKey(key_id=record.key_id, api_key=issued.api_key, site_id=record.site_id, role=record.role,
                     name=record.name, expires_at=record.expires_at)


@router.get("/keys", response_model=KeyList, responses=errors(401, 403, 503), summary="The admin's site's API keys")
def list_keys(principal: Admin, service: ServicesDep) -> KeyList:
    return KeyList(keys=[KeyInfo(key_id=record.key_id, site_id=record.site_id, role=record.role, name=record.name,
                                 created_at=record.created_at, expires_at=record.expires_at,
                                 revoked_at=record.revoked_at, last_used_at=record.last_used_at)
                         for record in service.keys.list(principal.site_id)])


@router.delete("/keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses=errors(401, 403, 404, 422, 503), summary="Revoke one of the site's API keys")
def revoke_key(key_id: str, principal: Admin,
               service: ServicesDep) -> Response:
    service.keys.revoke(key_id, site_id=principal.site_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
