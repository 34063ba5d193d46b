"""Talk to a running stable-avatar server over the fal queue protocol: upload, submit, follow, fetch, cancel.

Used by ``stable-avatar submit/status/result/cancel``. Plain ``urllib`` on purpose: the command line must work from a
bare install without pulling in an HTTP library, and the protocol is a handful of JSON calls. Uploads follow the
official JS client (``POST storage/upload/initiate`` then ``PUT`` the bytes), so the CLI exercises the same
routes a browser or ``@fal-ai/client`` would.
"""

from __future__ import annotations

import json
import mimetypes
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipeline.schema import APP_ID

DEFAULT_SERVER = "http://127.0.0.1:8000"
DEFAULT_APP_ID = APP_ID
SERVER_ENV = "STABLE_AVATAR_SERVER"
KEY_ENV = "FAL_KEY"
REMOTE_PREFIXES = ("http://", "https://", "data:")
MAX_STATUS_FAILURES = 10  # consecutive failed status polls before giving up
# Input fields and the CLI options that set them, so errors name what the user typed.
FIELD_OPTIONS = {
    "image_url": "--image", "audio_url": "--audio", "prompt": "--prompt", "aspect_ratio": "--aspect-ratio",
    "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale",
    "audio_guidance_scale": "--audio-guidance-scale", "seed": "--seed",
}


class ApiError(Exception):
    """A non-2xx answer (or no answer) from the server, with fal's ``detail`` kept for field-level messages."""

    def __init__(self, status: int, detail: Any, url: str = ""):
        self.status, self.detail, self.url = status, detail, url
        super().__init__(self.describe())

    def field_errors(self) -> list[tuple[str, str]]:
        """``(field, message)`` for each entry of a ``detail`` list (``loc`` is ``["body", field]``): a 422, or a
        413/415 for an input file that is too large or of the wrong kind."""
        if not isinstance(self.detail, list) or not all(isinstance(e, dict) and "loc" in e for e in self.detail):
            return []
        out = []
        for entry in self.detail:
            loc = entry.get("loc", []) if isinstance(entry, dict) else []
            name = ".".join(str(p) for p in loc[1:]) or ".".join(str(p) for p in loc) or "input"
            out.append((name, str(entry.get("msg", entry)) if isinstance(entry, dict) else str(entry)))
        return out

    def lines(self) -> list[str]:
        """What to tell the user: one line per invalid field, or one line for the whole error."""
        if self.status in (401, 403):
            what = "missing" if self.status == 401 else "wrong (or not allowed here)"
            return [f"the API key is {what}: pass --key or set {KEY_ENV} (server said: {_detail_text(self.detail)})"]
        if self.status == 0:
            return [f"could not reach the server at {self.url}: {self.detail}"]
        if self.status == 499:
            return ["the job was cancelled"]
        fields = self.field_errors()
        if fields:
            return [f"{_label(name)}: {msg}" for name, msg in fields]
        return [f"HTTP {self.status}: {_detail_text(self.detail)}"]

    def describe(self) -> str:
        return "; ".join(self.lines())


def _label(name: str) -> str:
    option = FIELD_OPTIONS.get(name)
    return f"{name} ({option})" if option else name


def _detail_text(detail: Any) -> str:
    if isinstance(detail, str):
        return detail
    return json.dumps(detail) if detail is not None else "no detail"


@dataclass
class Status:
    """One status answer, reduced to what a person follows: state, queue place, stage, progress, logs."""

    status: str
    queue_position: int | None = None
    stage: str | None = None
    fraction: float = 0.0
    logs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    error_type: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Status:
        progress = body.get("progress") or {}
        return cls(status=body.get("status", "UNKNOWN"), queue_position=body.get("queue_position"),
                   stage=progress.get("stage"), fraction=float(progress.get("fraction") or 0.0),
                   logs=list(body.get("logs") or []), error=body.get("error"), error_type=body.get("error_type"))

    @property
    def done(self) -> bool:
        return self.status == "COMPLETED"


class AvatarClient:
    """The queue API of one server (``server`` may include a route prefix, e.g. ``http://host/avatar``)."""

    def __init__(self, server: str, key: str | None = None, app_id: str = DEFAULT_APP_ID, timeout: float = 60.0):
        self.server, self.key, self.app_id, self.timeout = server.rstrip("/"), key or None, app_id.strip("/"), timeout

    # -- plumbing ----------------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"{self.server}/{path.lstrip('/')}"

    def _headers(self, url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"accept": "application/json", **(extra or {})}
        # The key goes only to our own server, never to a presigned storage URL on another host.
        if self.key and url.startswith(self.server + "/"):
            headers["authorization"] = f"Key {self.key}"
        return headers

    def call(self, method: str, url: str, body: Any = None, data: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, parsed JSON) for 2xx; raises :class:`ApiError` for anything else."""
        extra = dict(headers or {})
        if body is not None:
            data, extra["content-type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=self._headers(url, extra))
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as err:
            payload = _json(err.read())
            detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
            raise ApiError(err.code, detail, url) from None
        except (urllib.error.URLError, OSError) as err:
            raise ApiError(0, getattr(err, "reason", err), url) from None

    def _request_url(self, request_id: str, tail: str = "") -> str:
        return self.url(f"{self.app_id}/requests/{request_id}{tail}")

    # -- API ---------------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self.call("GET", self.url("health"))[1]

    def upload(self, path: Path) -> str:
        """initiate + PUT, as ``@fal-ai/client`` does; returns the ``file_url`` to put in the request."""
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        _, ticket = self.call("POST", self.url("storage/upload/initiate?storage_type=fal-cdn-v3"),
                              body={"content_type": content_type, "file_name": path.name})
        self.call("PUT", ticket["upload_url"], data=path.read_bytes(), headers={"content-type": content_type})
        return ticket["file_url"]

    def resolve(self, ref: str) -> str:
        """URLs and data URIs pass through; anything else is a local file to upload."""
        if ref.startswith(REMOTE_PREFIXES):
            return ref
        path = Path(ref).expanduser()
        if not path.is_file():
            raise FileNotFoundError(ref)
        return self.upload(path)

    def submit(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", self.url(self.app_id), body=payload)[1]

    def status_body(self, request_id: str, logs: bool = True) -> dict[str, Any]:
        """The server's status answer as it sent it (fal's fields plus ``progress``)."""
        return self.call("GET", self._request_url(request_id, f"/status?logs={int(logs)}"))[1]

    def status(self, request_id: str, logs: bool = True) -> Status:
        return Status.from_body(self.status_body(request_id, logs))

    def result(self, request_id: str) -> dict[str, Any] | None:
        """The output, or None while the job is not finished (202); a failed job raises its 4xx/5xx."""
        code, body = self.call("GET", self._request_url(request_id))
        return None if code == 202 else body

    def cancel(self, request_id: str) -> str:
        """``CANCELLATION_REQUESTED``, ``ALREADY_COMPLETED`` (the server's 400) or raises (404: unknown)."""
        try:
            return self.call("PUT", self._request_url(request_id, "/cancel"))[1]["status"]
        except ApiError as err:
            if err.status == 400 and isinstance(err.detail, dict):
                return str(err.detail.get("status", "ALREADY_COMPLETED"))
            if err.status == 400:
                return "ALREADY_COMPLETED"
            raise

    def download(self, url: str, out: Path) -> int:
        """Stream the video to ``out`` (written next to it, then renamed, so a broken download leaves nothing)."""
        request = urllib.request.Request(url, headers=self._headers(url))
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".part")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response, partial.open("wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
        except urllib.error.HTTPError as err:
            partial.unlink(missing_ok=True)
            raise ApiError(err.code, _json(err.read()), url) from None
        except (urllib.error.URLError, OSError) as err:
            partial.unlink(missing_ok=True)
            raise ApiError(0, getattr(err, "reason", err), url) from None
        os.replace(partial, out)
        return out.stat().st_size


def _json(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode(errors="replace")


def format_log(entry: dict[str, Any]) -> str:
    stamp = str(entry.get("timestamp", ""))[11:23]  # HH:MM:SS.mmm of the ISO time
    return f"  {stamp} {entry.get('level', 'INFO'):<5} {entry.get('message', '')}"


class LogCursor:
    """Which log lines were already shown; the server keeps only the last 500, so position alone is not enough."""

    def __init__(self) -> None:
        self.last: tuple[str, str] | None = None

    def new(self, logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = [(str(e.get("timestamp")), str(e.get("message"))) for e in logs]
        start = 0
        if self.last is not None and self.last in keys:
            start = len(keys) - keys[::-1].index(self.last)
        if logs:
            self.last = keys[-1]
        return logs[start:]


def follow(client: AvatarClient, request_id: str, out: TextIO = sys.stderr, poll_s: float = 0.5,
           show_logs: bool = True, sleep: Callable[[float], None] = time.sleep) -> Status:
    """Poll the status until the job completes, drawing a tqdm bar (0-100 %) and printing new log lines."""
    from tqdm import tqdm

    cursor, failures = LogCursor(), 0
    bar = tqdm(total=100, file=out, unit="%", dynamic_ncols=True, mininterval=0.2,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}{postfix}")
    try:
        while True:
            try:
                state = client.status(request_id, logs=show_logs)
                failures = 0
            except ApiError as err:  # a restarting proxy or a dropped connection: keep following for a while
                failures += 1
                if not (err.status == 0 or err.status >= 502) or failures > MAX_STATUS_FAILURES:
                    raise
                sleep(poll_s * 4)
                continue
            for entry in cursor.new(state.logs):
                bar.write(format_log(entry), file=out)
            bar.set_description_str(f"{(state.stage or state.status.lower()):>14}", refresh=False)
            bar.set_postfix_str(f"queue position {state.queue_position}" if state.status == "IN_QUEUE" else "",
                                refresh=False)
            target = 100 if state.done and not state.error else int(state.fraction * 100)
            bar.update(max(0, target - bar.n))
            bar.refresh()
            if state.done:
                return state
            sleep(poll_s)
    finally:
        bar.close()
