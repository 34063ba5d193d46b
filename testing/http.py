"""Loopback HTTP for tests and benchmarks: JSON requests that return 4xx/5xx answers instead of raising, and
free ports, process groups, metrics scrapes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open together, so they cannot repeat)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def http_json(method: str, url: str, body: dict | None = None, headers: dict | None = None,
              timeout: float = 300) -> tuple[int, dict, dict]:
    """(status, json body, headers) without raising on 4xx/5xx."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _parse(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, _parse(err.read()), dict(err.headers)


def _parse(payload: bytes):
    """JSON, or ``{"raw": text}`` for the plain-text answers of a proxy that is still starting."""
    if not payload:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return {"raw": payload.decode(errors="replace")}


def http_bytes(url: str, timeout: float = 60) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def stop_process_group(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """Ctrl-C to a server started with ``start_new_session=True`` (its whole group: Ray's processes too), then
    SIGKILL if it has not exited within ``timeout_s``; returns its exit status."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def scrape(url: str) -> dict[str, float]:
    """Our metrics (Ray exports them with a ``ray_`` prefix), summed over tags other than outcome/stage/direction."""
    values: dict[str, float] = {}
    for line in http_bytes(url).decode().splitlines():
        match = re.match(r"^ray_(stable_avatar_\w+?)(\{[^}]*\})? (\S+)$", line)
        if not match:
            continue
        name, labels, value = match.groups()
        keep = re.findall(r'(outcome|stage|direction)="([^"]*)"', labels or "")
        key = name + "".join(f"[{v}]" for _, v in keep)
        values[key] = values.get(key, 0.0) + float(value)
    return values


def queued_video(base: str, body: dict, timeout_s: float = 600) -> tuple[bytes, list[str]]:
    """Submit ``body`` to the fal queue at ``base``, wait for it to complete: (the mp4, the job's log messages)."""
    code, submitted, _ = http_json("POST", f"{base}/fal-ai/stable-avatar", body)
    assert code == 200, submitted
    status_url = submitted["status_url"] + "?logs=1"
    deadline = time.monotonic() + timeout_s
    while True:
        code, state, _ = http_json("GET", status_url)
        assert code in (200, 202), state
        if state["status"] == "COMPLETED":
            break
        assert time.monotonic() < deadline, f"the job did not finish within {timeout_s:g} s: {state}"
        time.sleep(0.3)
    assert "error" not in state, state
    code, output, _ = http_json("GET", submitted["response_url"])
    assert code == 200, output
    return http_bytes(output["video"]["url"]), [entry["message"] for entry in state["logs"]]
