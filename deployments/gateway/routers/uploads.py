"""Uploads, as both fal clients make them: JS ``initiate`` then a credential-free PUT to ``upload_url``; Python
``auth/token`` then ``files/upload`` with the token.

Every upload lands under ``uploads/<owner>/`` of the caller: the initiate route signs (owner, key) together, and
the PUT and token routes check the key's prefix against the signed owner before writing.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from deployments.gateway.bodies import BodyTooLarge, read_limited
from deployments.gateway.dependencies import Caller, Service
from deployments.gateway.errors import FalError, field_error
from deployments.gateway.urls import absolute, base_url
from deployments.storage import keys, validate_key

UPLOAD_TOKEN_TTL_S = 3600
MAX_UPLOAD_BYTES = 300 * 1024 * 1024
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
async def upload_initiate(body: UploadInitiate, request: Request, owner: Caller, service: Service) -> JSONResponse:
    subject = keys.owner_segment(owner)
    key = keys.upload_key(subject, safe_name(body.file_name))
    upload_url = service.storage.upload_url(key, body.content_type, UPLOAD_TOKEN_TTL_S)
    if upload_url is None:
        exp = int(time.time()) + UPLOAD_TOKEN_TTL_S
        sig = service.signer.sign("put", f"{subject}\n{key}", exp)
        upload_url = f"{base_url(request)}/storage/upload/put/{key}?owner={subject}&exp={exp}&sig={sig}"
    return JSONResponse({"upload_url": upload_url, "file_url": absolute(service.storage.url(key), request)})


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
    size = await _store_upload(request, key, service)
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
    key = keys.upload_key(subject, safe_name(request.headers.get("x-fal-file-name") or "upload.bin"))
    if not keys.is_upload_key_of(key, subject):  # the name is one plain segment
        raise FalError(403, OUTSIDE_PREFIX)
    await _store_upload(request, validate_key(key), service)
    return JSONResponse({"access_url": absolute(service.storage.url(key), request)})


async def _store_upload(request: Request, key: str, service: Service) -> int:
    try:
        data = await read_limited(request, MAX_UPLOAD_BYTES)
    except BodyTooLarge:
        raise FalError(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes") from None
    await asyncio.to_thread(service.storage.put_bytes, key, data,
                            request.headers.get("content-type", "application/octet-stream"))
    return len(data)
