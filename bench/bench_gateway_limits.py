"""What the Gateway's limits cost on the hot path, at 10,000 job rows: the Gateway's FastAPI app in process (no Ray)
over a SQLite jobs database and local storage, driven through an ASGI client.

Side by side, interleaved sample by sample so load on the shared machine hits each alike:

- **submit**: ``POST /fal-ai/stable-avatar`` end to end (caps and submit token, body, row), and the admission
  alone (``admit_job``: two counts and one token, the part the limits add before the body is read);
- **status**: ``GET .../status`` end to end, and the request budget alone (the in-memory token bucket).

The rows are queued jobs of eight keys (the benchmark's key among them), so the queue counts run over the whole
backlog (the worst case). Inputs are URLs, which submit keeps as they are: the figures are the Gateway's and the
database's, not storage writes.

    python bench/bench_gateway_limits.py [--rows 10000] [--samples 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.stats import load_average, summary  # noqa: E402
from deployments.config import AppArgs  # noqa: E402
from deployments.gateway.app import build_api  # noqa: E402
from deployments.gateway.auth import fingerprint  # noqa: E402
from deployments.gateway.limits import admit_job  # noqa: E402
from deployments.gateway.service import GatewayService  # noqa: E402
from deployments.runtime.service_state import open_service_state  # noqa: E402

KEYS_ENV = "STABLE_AVATAR_BENCH_LIMITS_KEYS"
KEY = "bench-limits-key-0123456789"
APP = "fal-ai/stable-avatar"
BODY = {"image_url": "https://example.com/portrait.png", "audio_url": "https://example.com/speech.wav",
        "prompt": "a person talking", "num_inference_steps": 1}
RESULTS = ROOT / "bench" / "results"


def fill(service: GatewayService, rows: int) -> float:
    """``rows`` queued jobs of eight keys; returns the seconds it took."""
    started = time.perf_counter()
    owners = [fingerprint(KEY)] + [f"owner{n}" for n in range(7)]
    for n in range(rows):
        service.store.sync.submit(app_id=APP, input={"request": BODY}, seed=n, owner=owners[n % len(owners)],
                                  rate_limited=False)
    return time.perf_counter() - started


async def measure(service: GatewayService, samples: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {"submit": [], "admission": [], "status": [], "request_budget": []}
    owner, headers = fingerprint(KEY), {"authorization": f"Key {KEY}"}
    transport = httpx.ASGITransport(build_api(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        request_id = None
        for _ in range(samples):
            started = time.perf_counter()
            answer = await client.post(f"/{APP}", json=BODY, headers=headers)
            timings["submit"].append(time.perf_counter() - started)
            assert answer.status_code == 200, answer.text
            request_id = request_id or answer.json()["request_id"]
            started = time.perf_counter()
            await admit_job(service.store, owner, queued=True)
            timings["admission"].append(time.perf_counter() - started)
            started = time.perf_counter()
            answer = await client.get(f"/{APP}/requests/{request_id}/status", headers=headers)
            timings["status"].append(time.perf_counter() - started)
            assert answer.status_code == 202, answer.text
            started = time.perf_counter()
            service.requests.take_or_refuse(owner)
            timings["request_budget"].append(time.perf_counter() - started)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=300)
    options = parser.parse_args()
    os.environ[KEYS_ENV] = KEY
    root = Path(tempfile.mkdtemp(prefix="bench-gateway-limits-"))
    args = AppArgs.model_validate({
        "storage": {"kind": "local", "root": str(root)}, "max_queue_length": options.rows * 4,
        "auth": {"keys_env": KEYS_ENV, "max_queued_per_key": options.rows * 2, "submit_rate_per_minute": 1e9,
                 "submit_burst": 10**9, "request_rate_per_minute": 1e9, "request_burst": 10**9}})
    state = open_service_state(args)
    service = GatewayService(args, state, orchestrator=None, readiness={})  # type: ignore[arg-type]
    load_before = load_average()
    fill_s = fill(service, options.rows)
    timings = asyncio.run(measure(service, options.samples))
    state.store.close()
    figures = {name: summary(values, 3) for name, values in timings.items()}
    report = {"rows": options.rows, "samples": options.samples, "fill_s": round(fill_s, 1),
              "load_average_before": load_before, "load_average_after": load_average(), "figures": figures,
              "admission_share_of_submit_p50": round(figures["admission"]["p50_ms"] / figures["submit"]["p50_ms"], 3),
              "budget_share_of_status_p50": round(figures["request_budget"]["p50_ms"] / figures["status"]["p50_ms"],
                                                  4)}
    lines = [f"Gateway limits on the hot path: {options.rows} queued rows (SQLite), {options.samples} samples each, "
             "interleaved", f"load average before {load_before}, after {report['load_average_after']}", "",
             f"{'what':<16}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}"]
    for name, figure in figures.items():
        lines.append(f"{name:<16}{figure['p50_ms']:>10.3f}{figure['p95_ms']:>10.3f}{figure['max_ms']:>10.3f}")
    lines += ["", f"admission / submit (p50): {report['admission_share_of_submit_p50']:.1%}",
              f"request budget / status (p50): {report['budget_share_of_status_p50']:.2%}"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gateway_limits.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "gateway_limits.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
