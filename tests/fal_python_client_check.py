"""Drives the official ``fal-client`` (PyPI, pinned in the ``dev`` extra) against a self-hosted stable-avatar-serve.

    python tests/fal_python_client_check.py SCENARIO [SCENARIO...] --image PNG --audio WAV --long-audio WAV
        [--queue-base URL] [--rest-base URL] [--steps N]

It runs in its own process because fal_client reads ``FAL_RUN_HOST``/``FAL_QUEUE_RUN_HOST`` once, at import:
the HTTPS test sets those (plus ``SSL_CERT_FILE``) in the environment; the plain-HTTP test passes ``--queue-base``
instead, which patches ``QUEUE_URL_FORMAT``/``RUN_URL_FORMAT`` (the client only ever builds ``https://`` from the
environment). Uploads always need ``--rest-base``: ``REST_URL``/``CDN_URL`` have no environment variable.

Scenarios: subscribe, queue, cancel, priority, upload, validation, run. Each prints one JSON line
``{"scenario", "ok", ...observations}``; tests/test_fal_clients*.py assert on them. Exit status 1 when a scenario
raised unexpectedly (its line then has ``"ok": false`` and ``"error"``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import fal_client
import fal_client.client as fal_module
import httpx

APP = "fal-ai/stable-avatar"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="+")
    parser.add_argument("--image", required=True)
    parser.add_argument("--audio", required=True)
    parser.add_argument("--long-audio", required=True, help="speech for a job that must still run while the scenario "
                        "makes its other calls")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--queue-base", help="patch QUEUE_URL_FORMAT; RUN_URL_FORMAT becomes BASE/run/")
    parser.add_argument("--rest-base", help="patch REST_URL and CDN_URL (before the first upload)")
    return parser.parse_args(argv)


class Checks:
    """One method per scenario; each returns the observations to print."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.image_uri = fal_client.encode_file(args.image)
        self.audio_uri = fal_client.encode_file(args.audio)
        self.long_audio_uri = fal_client.encode_file(args.long_audio)

    def input(self, **overrides: Any) -> dict[str, Any]:
        return {"image_url": self.image_uri, "audio_url": self.audio_uri, "prompt": "a person talking",
                "num_inference_steps": self.args.steps, "aspect_ratio": "1:1", "seed": 7, **overrides}

    @staticmethod
    def http_error(call: Callable[[], Any]) -> dict[str, Any]:
        """What a FalClientHTTPError carried (the scenarios expect one)."""
        try:
            call()
        except fal_client.FalClientHTTPError as exc:
            return {"raised": type(exc).__name__, "status_code": exc.status_code, "message": exc.message,
                    "error_type": exc.error_type, "request_id": exc.response_headers.get("x-fal-request-id"),
                    "timeout_type": exc.response_headers.get("x-fal-request-timeout-type")}
        return {"raised": None}

    @staticmethod
    def wait(handle: fal_client.SyncRequestHandle, timeout_s: float = 120) -> fal_client.Completed:
        deadline = time.monotonic() + timeout_s
        while not isinstance(status := handle.status(), fal_client.Completed):
            if time.monotonic() > deadline:
                raise TimeoutError(f"request {handle.request_id} did not complete")
            time.sleep(0.1)
        return status

    @staticmethod
    def wait_left_queue(handle: fal_client.SyncRequestHandle, timeout_s: float = 120) -> fal_client.Status:
        """Polls until the request is running or done (a runner claims queued jobs asynchronously)."""
        deadline = time.monotonic() + timeout_s
        while isinstance(status := handle.status(), fal_client.Queued):
            if time.monotonic() > deadline:
                raise TimeoutError(f"request {handle.request_id} stayed queued")
            time.sleep(0.1)
        return status

    def subscribe(self) -> dict[str, Any]:
        """subscribe(with_logs=True, on_queue_update=...): the update types and the logs InProgress carried."""
        updates: list[dict[str, Any]] = []
        enqueued: list[str] = []

        def on_update(update: fal_client.Status) -> None:
            logs = getattr(update, "logs", None)
            updates.append({"type": type(update).__name__, "logs": None if logs is None else len(logs),
                            "log_keys": sorted(logs[0]) if logs else None})

        result = fal_client.subscribe(APP, arguments=self.input(), with_logs=True, on_enqueue=enqueued.append,
                                      on_queue_update=on_update)
        return {"updates": updates, "types": [u["type"] for u in updates], "enqueued": enqueued, "result": result}

    def queue(self) -> dict[str, Any]:
        """submit / status(with_logs False and True) / result, and get_handle() equal to the submitted handle."""
        handle = fal_client.submit(APP, arguments=self.input())
        polled: list[dict[str, Any]] = []
        deadline = time.monotonic() + 120
        while True:
            status = handle.status(with_logs=False)
            polled.append({"type": type(status).__name__, "logs": getattr(status, "logs", "absent")})
            if isinstance(status, fal_client.Completed) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        with_logs = handle.status(with_logs=True)
        rebuilt = fal_client.SyncClient().get_handle(APP, handle.request_id)

        def urls(h: fal_client.SyncRequestHandle) -> tuple[str, ...]:  # the httpx client differs, not the URLs
            return h.request_id, h.response_url, h.status_url, h.cancel_url

        return {
            "request_id": handle.request_id, "status_url": handle.status_url, "response_url": handle.response_url,
            "cancel_url": handle.cancel_url, "rebuilt_equal": urls(rebuilt) == urls(handle), "polled": polled,
            "with_logs": {"type": type(with_logs).__name__, "logs": len(with_logs.logs or []),
                          "metrics": getattr(with_logs, "metrics", None)},
            "status_by_id": type(fal_client.status(APP, handle.request_id)).__name__,
            "result": handle.get(), "result_by_id": fal_client.result(APP, handle.request_id),
        }

    def cancel(self) -> dict[str, Any]:
        """Three jobs on a one-job server: cancel the queued middle one, then the running first one, then a finished
        one (400). The first job speaks the long audio at 100 steps, so it still runs while the others' positions
        are read however loaded the machine is; it is cancelled once they are."""
        first = fal_client.submit(APP, arguments=self.input(audio_url=self.long_audio_uri, num_inference_steps=100))
        middle, last = (fal_client.submit(APP, arguments=self.input(seed=i)) for i in range(1, 3))
        first_running = self.wait_left_queue(first)
        before, last_before = middle.status(), last.status()
        middle.cancel()  # raises on a non-2xx answer
        after, last_after = middle.status(with_logs=True), last.status()
        cancelled_result = self.http_error(middle.get)
        first.cancel()  # running: accepted
        first_final = self.wait(first)
        self.wait(last)
        cancel_completed = self.http_error(last.cancel)
        return {
            "first_running": type(first_running).__name__, "middle_before": type(before).__name__, "middle_position": getattr(before, "position", None),
            "last_position_before": getattr(last_before, "position", None),
            "middle_after": {"type": type(after).__name__, "error": getattr(after, "error", None),
                             "error_type": getattr(after, "error_type", None)},
            "last_position_after": getattr(last_after, "position", None),
            "cancelled_result": cancelled_result, "cancel_completed": cancel_completed,
            "first_final_error_type": getattr(first_final, "error_type", None),
            "cancel_unknown": self.http_error(lambda: fal_client.cancel(APP, "no-such-request")),
            "last_result_has_video": "video" in last.get(),
        }

    def priority(self) -> dict[str, Any]:
        """submit(hint=, start_timeout=, priority=) on a one-job server: while a long job runs, a job whose
        start_timeout (10 s) passes in the queue fails with fal's user timeout, and a low-priority job yields to a
        later normal one (the client sends X-Fal-Runner-Hint, X-Fal-Request-Timeout "10.0", X-Fal-Queue-Priority)."""
        blocker = fal_client.submit(APP, arguments=self.input(audio_url=self.long_audio_uri, num_inference_steps=100))
        deadline = time.monotonic() + 120
        while not isinstance(blocker.status(), fal_client.InProgress):
            if time.monotonic() > deadline:
                raise TimeoutError("the blocking job never started")
            time.sleep(0.1)
        late = fal_client.submit(APP, arguments=self.input(seed=3), start_timeout=10)
        low = fal_client.submit(APP, arguments=self.input(seed=1), priority="low", start_timeout=60)
        normal = fal_client.submit(APP, arguments=self.input(seed=2), priority="normal", hint="any-runner")
        positions = {name: getattr(handle.status(), "position", None)
                     for name, handle in (("late", late), ("normal", normal), ("low", low))}
        late_status = self.wait(late, timeout_s=60)
        blocker_while_late_failed = type(blocker.status()).__name__
        late_result = self.http_error(late.get)
        low.cancel()
        # Only so that the normal job need not wait for it: the blocker may have finished since its status was
        # read, and fal answers a cancel of a finished request with 400 ALREADY_COMPLETED.
        blocker_cancel = self.http_error(blocker.cancel)
        self.wait(normal)
        return {"positions": positions, "blocker_while_late_failed": blocker_while_late_failed,
                "blocker_cancel": blocker_cancel,
                "late_status": {"error": getattr(late_status, "error", None),
                                "error_type": getattr(late_status, "error_type", None)},
                "late_result": late_result, "normal_has_video": "video" in normal.get()}

    def upload(self) -> dict[str, Any]:
        """upload_file (token + files/upload) for both inputs, then a job that reads those URLs."""
        urls = {"image_url": fal_client.upload_file(self.args.image),
                "audio_url": fal_client.upload_file(self.args.audio)}
        with open(self.args.image, "rb") as f:
            round_trip = httpx.get(urls["image_url"]).content == f.read()
        result = fal_client.subscribe(APP, arguments=self.input(**urls))
        return {"urls": urls, "round_trip_equal": round_trip, "result": result}

    def validation(self) -> dict[str, Any]:
        """A 422 is a FalClientHTTPError whose message (the ``detail`` list) names the field."""
        no_prompt = self.input()
        del no_prompt["prompt"]
        return {"zero_steps": self.http_error(lambda: fal_client.submit(APP, arguments=self.input(
                    num_inference_steps=0))),
                "missing_prompt": self.http_error(lambda: fal_client.submit(APP, arguments=no_prompt))}

    def run(self) -> dict[str, Any]:
        """run(): the synchronous route, through RUN_URL_FORMAT."""
        return {"run_url": fal_module.RUN_URL_FORMAT, "result": fal_client.run(APP, arguments=self.input())}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.queue_base:
        base = args.queue_base.rstrip("/")
        fal_module.QUEUE_URL_FORMAT, fal_module.RUN_URL_FORMAT = f"{base}/", f"{base}/run/"
    if args.rest_base:
        fal_module.REST_URL = fal_module.CDN_URL = args.rest_base.rstrip("/")
    checks, failed = Checks(args), False
    for name in args.scenarios:
        scenario = getattr(checks, name, None) if not name.startswith("_") else None
        try:
            if scenario is None or name in ("input", "http_error", "wait"):
                raise ValueError(f"unknown scenario {name!r}")
            line = {"scenario": name, "ok": True, **scenario()}
        except Exception as exc:  # noqa: BLE001 - reported as a failed scenario line
            line = {"scenario": name, "ok": False, "error": repr(exc), "traceback": traceback.format_exc()}
        failed |= not line["ok"]
        print(json.dumps(line, default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
