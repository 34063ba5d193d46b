"""Loopback HTTP for tests and benchmarks: JSON requests that return 4xx/5xx answers instead of raising, and
free ports, metrics scrapes."""

from __future__ import annotations

import collections
import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request

# Ports below the kernel's ephemeral range (32768-60999 here) and above Ray's worker ports (10002-19999): a port
# handed out from the ephemeral range can be taken by any outgoing connection (Ray opens many) before the server
# that was meant to have it binds it.
_PORT_RANGE = (20000, 32768)
_recently_handed_out: collections.deque[int] = collections.deque(maxlen=512)


def _worker_port_range() -> range:
    """This process's share of :data:`_PORT_RANGE`: each pytest-xdist worker has its own slice, so two workers
    never pick the same port between checking it and binding it."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    low, high = _PORT_RANGE
    width = (high - low) // max(count, 1)
    start = low + (index % max(count, 1)) * width
    return range(start, start + width)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that nothing listens on, from this process's slice of a range no
    outgoing connection uses, and none handed out by this process recently."""
    candidates = _worker_port_range()
    offset = random.randrange(len(candidates))
    ports: list[int] = []
    for step in range(len(candidates)):
        port = candidates[(offset + step) % len(candidates)]
        if port in _recently_handed_out or not _bindable(port):
            continue
        ports.append(port)
        _recently_handed_out.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"fewer than {n} free ports in {candidates}")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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
