"""Signed links to local-storage files (``GET /files/<key>?exp=..&sig=..``); S3 links point at the bucket."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

from deployments.gateway.dependencies import Service
from deployments.storage import LocalStorage, StorageNotFoundError

router = APIRouter()


def _not_found() -> JSONResponse:
    return JSONResponse({"detail": "not found"}, status_code=404)


@router.get("/files/{key:path}", response_model=None)
async def files(key: str, service: Service, exp: int = 0, sig: str = "") -> Response:
    storage = service.storage
    if not isinstance(storage, LocalStorage):
        return _not_found()
    try:
        if not storage.verify_signature(key, exp, sig):
            return JSONResponse({"detail": "invalid or expired link"}, status_code=403)
        path = storage.path_for(key)
    except (ValueError, StorageNotFoundError):
        return _not_found()
    if not path.is_file():
        return _not_found()
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, filename=path.name)
