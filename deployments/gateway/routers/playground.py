"""The playground: static files shipped in the package (relative URLs, so it works under a route prefix)."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
router = APIRouter()


@router.get("/", response_model=None)
async def playground() -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/static/{name:path}", response_model=None)
async def static(name: str) -> Response:
    path = (STATIC_DIR / name).resolve()
    if not path.is_file() or STATIC_DIR.resolve() not in path.parents:
        return JSONResponse({"detail": "not found"}, status_code=404)
    return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")
