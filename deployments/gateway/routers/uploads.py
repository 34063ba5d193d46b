"""Uploads, as both fal clients make them: JS ``initiate`` then a credential-free PUT to ``upload_url``; Python
``auth/token`` then ``files/upload`` with the token. Sizes, the quota and link lifetimes:
:mod:`deployments.gateway.uploads`.

Every upload lands under ``uploads/<owner>/`` of the caller: the initiate route signs (owner, key) together, and
the PUT and token routes check the key's prefix against the signed owner before writing. Each of these requests
takes a token of the owner's request budget before it reads a body.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from deployments.gateway.bodies import read_model
from deployments.gateway.dependencies import Caller, Service
from deployments.gateway.errors import FalError, field_error
from deployments.gateway.urls import absolute, base_url
from deployments.storage import keys, validate_key

UPLOAD_TOKEN_TTL_S = 3600
MAX_INITIATE_BYTES = 64 * 1024  # {"content_type", "file_name"}
_OWNER_SEGMENT = re.compile(r"[A-Za-z0-9]{1,64}")
router = APIRouter()


class UploadInitiate(BaseModel):
    content_type: str = "application/octet-stream"
    file_name: str = "upload.bin"


def safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name.strip())[:100].lstrip(".")
    return cleaned or "upload.bin"


OUTSIDE_PREFIX = "uploads may only be written under the caller's own uploads/<owner>/ prefix"


@router.post("/storage/upload/initiate")
async def upload_initiate(request: Request, owner: Caller, service: Service) -> JSONResponse:
    """A key under the caller's prefix, the signed Gateway URL to PUT it to, and the link it will have."""
    body = await read_model(request, UploadInitiate, MAX_INITIATE_BYTES,
                            f"request body larger than {MAX_INITIATE_BYTES} bytes", empty=b"{}")
    subject = keys.owner_segment(owner)
    await service.uploads.check_room(subject)  # 413 now, before the client sends the bytes, when it is spent
    key = keys.upload_key(subject, safe_name(body.file_name))
    exp = int(time.time()) + UPLOAD_TOKEN_TTL_S
    sig = service.signer.sign("put", f"{subject}\n{key}", exp)
    upload_url = f"{base_url(request)}/storage/upload/put/{key}?owner={subject}&exp={exp}&sig={sig}"
    return JSONResponse({"upload_url": upload_url, "file_url": absolute(service.uploads.link(key), request)})


@router.put("/storage/upload/put/{key:path}")
async def upload_put(key: str, request: Request, service: Service, owner: str = "", exp: int = 0,
                     sig: str = "") -> JSONResponse:
    if not service.signer.verify(sig, "put", f"{owner}\n{key}", exp):
        raise FalError(403, "invalid or expired upload URL")
    if not _OWNER_SEGMENT.fullmatch(owner) or not key.startswith(keys.uploads_prefix(owner)):
        raise FalError(403, OUTSIDE_PREFIX)
    try:
        validate_key(key)
    except ValueError as exc:
        raise field_error(["path", "key"], str(exc)) from None
    service.requests.take_or_refuse(owner)
    size = await service.uploads.receive(request, owner, key)
    return JSONResponse({"status": "ok", "file_size": size})


@router.post("/storage/auth/token")
async def upload_token(request: Request, owner: Caller, service: Service) -> JSONResponse:
    exp, subject = int(time.time()) + UPLOAD_TOKEN_TTL_S, keys.owner_segment(owner)
    token = f"{exp}.{subject}.{service.signer.sign('upload-token', subject, exp)}"
    return JSONResponse({"token": token, "token_type": "Bearer", "base_url": base_url(request),
                         "expires_at": datetime.fromtimestamp(exp, UTC).isoformat()})


@router.post("/files/upload")
async def files_upload(request: Request, service: Service) -> JSONResponse:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    exp_text, _, rest = token.partition(".")
    subject, _, sig = rest.partition(".")
    valid = scheme.lower() == "bearer" and exp_text.isdigit() and _OWNER_SEGMENT.fullmatch(subject)
    if not valid or not service.signer.verify(sig, "upload-token", subject, int(exp_text)):
        raise FalError(401, "a valid upload token is required (POST /storage/auth/token)")
    service.requests.take_or_refuse(subject)
    key = keys.upload_key(subject, safe_name(request.headers.get("x-fal-file-name") or "upload.bin"))
    if not keys.is_upload_key_of(key, subject):  # the name is one plain segment
        raise FalError(403, OUTSIDE_PREFIX)
    await service.uploads.receive(request, subject, validate_key(key))
    return JSONResponse({"access_url": absolute(service.uploads.link(key), request)})
