"""Gateway: the FastAPI ingress (CPU). Sync fal route, health, signed local files, and the Python handle API."""


import logging
import mimetypes
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve

from deployments.config import AppArgs
from deployments.errors import error_response
from deployments.storage import LocalStorage, StorageNotFoundError, make_storage
from pipeline.schema import StableAvatarInput, StableAvatarOutput

logger = logging.getLogger("ray.serve")
api = FastAPI(title="stable-avatar-serve", description="fal-ai/stable-avatar compatible video generation")


def _absolute(url: str, request: Request) -> str:
    """Local-storage URLs are relative (``/files/...``) unless a public base URL is configured."""
    return str(request.base_url).rstrip("/") + url if url.startswith("/") else url


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, orchestrator, args: AppArgs) -> None:
        self.orchestrator, self.args = orchestrator, args
        self.storage = make_storage(args.storage)
        logger.info("gateway for %s, preset %s, storage %s", args.app_id, args.preset, self.storage.describe())

    # -- Python API: serve.get_app_handle("stable-avatar").generate.remote(StableAvatarInput(...)) ---------------
    async def generate(self, request: StableAvatarInput) -> StableAvatarOutput:
        return await self.orchestrator.generate.remote(request, uuid.uuid4().hex)

    # -- HTTP ------------------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await self.orchestrator.ping.remote()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "app_id": self.args.app_id, "preset": self.args.preset})

    @api.post("/run/{app_id:path}")
    async def run_sync(self, app_id: str, body: StableAvatarInput, request: Request) -> JSONResponse:
        if app_id.strip("/") != self.args.app_id:
            return JSONResponse({"detail": f"unknown application {app_id!r}"}, status_code=404)
        request_id = request.headers.get("x-fal-request-id") or uuid.uuid4().hex
        try:
            output: StableAvatarOutput = await self.orchestrator.generate.remote(body, request_id)
        except Exception as exc:  # noqa: BLE001 - mapped to a fal error body
            status, payload = error_response(exc)
            if status >= 500:
                logger.exception("request %s failed", request_id)
            return JSONResponse(payload, status_code=status, headers={"x-fal-request-id": request_id})
        output.video.url = _absolute(output.video.url, request)
        return JSONResponse(output.model_dump(), headers={"x-fal-request-id": request_id})

    @api.get("/progress/{request_id}")
    async def progress(self, request_id: str) -> JSONResponse:
        """Progress of a sync request sent with an ``x-fal-request-id`` header (the queue API has richer status)."""
        state = await self.orchestrator.get_progress.remote(request_id)
        if state is None:
            return JSONResponse({"detail": "unknown request"}, status_code=404)
        return JSONResponse(state)

    @api.get("/files/{key:path}", response_model=None)
    async def files(self, key: str, exp: int = 0, sig: str = "") -> Response:
        if not isinstance(self.storage, LocalStorage):
            return JSONResponse({"detail": "not found"}, status_code=404)
        try:
            if not self.storage.verify_signature(key, exp, sig):
                return JSONResponse({"detail": "invalid or expired link"}, status_code=403)
            path = self.storage.path_for(key)
        except ValueError:
            return JSONResponse({"detail": "not found"}, status_code=404)
        except StorageNotFoundError:
            return JSONResponse({"detail": "not found"}, status_code=404)
        if not path.is_file():
            return JSONResponse({"detail": "not found"}, status_code=404)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, filename=path.name)
