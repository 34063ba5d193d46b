"""A catalogue of malformed and hostile inputs through the running service (Ray + Serve, the shared cluster).

Each bad input gets a 4xx naming the field and the problem: schema and ``data:`` URI errors at submit time (422,
413), media and fetch errors when the job runs (the job completes with an error; its result is the 4xx). Afterwards the service is
healthy, the next valid job succeeds, the forbidden server on 127.0.0.1 was never contacted, and no temporary
file was left behind.

Unknown fields are accepted and ignored, as fal does (its schemas are FastAPI models that ignore extras): the
final valid job carries some and must succeed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest

from testing.http import http_bytes, http_json
from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE
from testing.ray_serve import replica_processes
from tests.test_fetch import FileServer, drip, redirect, send, static, stream
from tests.test_media_validation import encoded, make_media, png_declaring

APP = "fal-ai/stable-avatar"
APP_NAME = "bad-inputs"  # its Serve application on the shared cluster
ALLOWED_IP = "127.0.0.2"
# Prefixes of the temporary files and folders our code makes (pipeline/media/audio.py, validate.py,
# generator.py, postprocessor.py).
TEMP_PREFIXES = ("stable-avatar-", "sa-audio-")
MIB = 1024 * 1024


def b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The allowed file server (127.0.0.2) and a forbidden one (127.0.0.1) that must never be contacted."""
    media = make_media(tmp_path_factory.mktemp("bad-media"))
    forbidden = FileServer({"/portrait.png": static(EXAMPLE_IMAGE.read_bytes(), "image/png")}, host="127.0.0.1")
    png = EXAMPLE_IMAGE.read_bytes()
    routes = {
        "/portrait.png": static(png, "image/png"),
        "/speech.wav": static(EXAMPLE_AUDIO.read_bytes(), "audio/wav"),
        "/truncated.png": static(png[: len(png) // 2], "image/png"),
        "/avatar.svg": static(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
        "/photo.png": static(b"<!DOCTYPE html><html><body><h1>Access denied</h1></body></html>", "text/html"),
        "/speech.mp3": static(b"<html><head><title>502 Bad Gateway</title></head></html>", "text/html"),
        "/corrupt.mp3": static(media["corrupt_mp3"], "audio/mpeg"),
        "/clip.mp4": static(media["video_no_audio"], "video/mp4"),
        "/to-private.png": redirect(forbidden.url("/portrait.png")),
        "/drip.png": drip(0.3),
        "/no-length.png": stream(50 * MIB, declared=None),
        "/lying.png": stream(50 * MIB, declared=10),
        "/gone.png": lambda h: send(h, b"<html>not found</html>", "text/html", status=404),
    }
    server = FileServer(routes)
    yield {"server": server, "forbidden": forbidden, "media": media}
    server.close()
    forbidden.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory, files, serve_cluster):
    root = tmp_path_factory.mktemp("bad-inputs-data")
    # The replicas' TMPDIR is a folder of our own, so their temporary files land there: leftovers are then ours,
    # not another test's.
    tmpdir = tempfile.mkdtemp(prefix="sa-bad-")
    try:
        serve_cluster.deploy({
            "device": "cpu", "max_running_jobs": 16, "checkpoint_every_steps": 0,
            "storage": serve_cluster.local_storage(root),
            "denoiser": {"num_replicas": 1, "max_ongoing_requests": 1},
            "preprocessor": {"max_ongoing_requests": 16},
            "auth": {"submit_rate_per_minute": 60000, "submit_burst": 1000, "max_running_per_key": 16},
            "inputs": {
                "allow_private_hosts": [ALLOWED_IP],
                # Timeouts that only the drip route outlasts (60 s), with room for a loaded machine: a fetch
                # that is merely slow must still meet its own error (too large, not an image ...).
                "fetch": {"max_image_bytes": MIB, "max_audio_bytes": 4 * MIB, "connect_timeout_s": 5.0,
                          "read_timeout_s": 5.0, "total_timeout_s": 8.0},
            },
        }, name=APP_NAME, env={"TMPDIR": tmpdir})
        yield {"base": serve_cluster.base, "tmpdir": tmpdir}
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# -- the catalogue --------------------------------------------------------------------------------------------


@dataclass
class Bad:
    name: str
    status: int
    loc: list
    text: str = ""
    fields: dict = field(default_factory=dict)  # merged into a valid body
    raw: bytes | None = None  # sent as the body instead
    at_submit: bool = False
    kind: str | None = None  # the detail's machine-readable ``type``, when the test pins it


def catalogue(files) -> list[Bad]:
    url = files["server"].url
    media = files["media"]
    too_big = b64(bytes(range(256)) * (6 * 1024), "image/png")  # 1.5 MiB > the 1 MiB image limit
    image, audio = ["body", "image_url"], ["body", "audio_url"]
    return [
        # -- image content
        Bad("non-image bytes", 415, image, "not a recognised image",
            {"image_url": b64(b"\x00\x01\x02garbage\xff" * 64, "image/png")}),
        Bad("truncated PNG", 422, image, "truncated or corrupt", {"image_url": url("/truncated.png")}),
        Bad("1x1 image", 422, image, "too small: 1x1", {"image_url": b64(encoded((1, 1), "PNG"), "image/png")},
            kind="image_too_small"),
        Bad("decompression bomb", 413, image, "decompression bomb",
            {"image_url": b64(png_declaring(30000, 30000), "image/png")}, kind="image_too_large"),
        Bad("40+ MP image header", 413, image, "49.0 MP", {"image_url": b64(png_declaring(7000, 7000), "image/png")}),
        Bad("SVG", 415, image, "svg", {"image_url": url("/avatar.svg")}, kind="unsupported_image_format"),
        Bad("HTML error page served as image", 415, image, "received an html page, not an image",
            {"image_url": url("/photo.png")}),
        # -- audio content
        Bad("silent 0.1 s audio", 422, audio, "too short", {"audio_url": b64(media["short_wav"], "audio/wav")}),
        Bad("2 h audio", 422, audio, "too long: 7200.0 s", {"audio_url": b64(media["two_hours_mp3"], "audio/mpeg")},
            kind="audio_duration_too_long"),
        Bad("corrupt mp3", 415, audio, "not a recognised audio format", {"audio_url": url("/corrupt.mp3")},
            kind="unsupported_audio_format"),
        Bad("video file as audio", 422, audio, "video without an audio track", {"audio_url": url("/clip.mp4")}),
        Bad("HTML page as audio", 415, audio, "received an html page, not audio", {"audio_url": url("/speech.mp3")}),
        # -- data URIs (decoded at submit, where they are stored once with the job)
        Bad("malformed data URI", 422, image, "malformed data: uri",
            {"image_url": "data:image/png;base64,this is not base64!"}, at_submit=True),
        Bad("data URI without comma", 422, audio, "malformed data: uri", {"audio_url": "data:audio/wav;base64"},
            at_submit=True),
        Bad("oversized data URI", 413, image, "too large", {"image_url": too_big}, kind="file_too_large",
            at_submit=True),
        # -- addresses (SSRF)
        Bad("URL to 127.0.0.1", 422, image, "loopback address (127.0.0.1)",
            {"image_url": files["forbidden"].url("/portrait.png")}, kind="url_not_allowed"),
        Bad("URL to 169.254.169.254", 422, image, "link-local address (169.254.169.254)",
            {"image_url": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"}),
        Bad("URL to [::1]", 422, audio, "loopback address (::1)", {"audio_url": "http://[::1]:8000/a.wav"}),
        Bad("IPv4-mapped IPv6", 422, image, "loopback address (::ffff:127.0.0.1)",
            {"image_url": "http://[::ffff:127.0.0.1]/x.png"}),
        Bad("decimal IPv4", 422, image, "loopback address (127.0.0.1)", {"image_url": "http://2130706433/x.png"}),
        Bad("private 10/8", 422, audio, "private address (10.0.0.1)", {"audio_url": "http://10.0.0.1/a.wav"}),
        Bad("redirect to a private host", 422, image, "redirected to http://127.0.0.1",
            {"image_url": url("/to-private.png")}),
        Bad("file:///etc/passwd", 422, image, "scheme file: is not allowed", {"image_url": "file:///etc/passwd"}),
        Bad("gopher://", 422, audio, "scheme gopher: is not allowed",
            {"audio_url": "gopher://127.0.0.1:6379/_FLUSHALL"}),
        Bad("s3 bucket not allowed", 422, image, "bucket", {"image_url": "s3://internal-secrets/key.png"}),
        # -- hostile servers
        Bad("slow drip server", 422, image, "within 8 s", {"image_url": url("/drip.png")}),
        Bad("no Content-Length, 50 MB", 413, image, "too large", {"image_url": url("/no-length.png")}),
        Bad("Content-Length says 10, sends 50 MB", 415, image, "received text, not an image",
            {"image_url": url("/lying.png")}),
        Bad("HTTP 404", 422, image, "answered http 404", {"image_url": url("/gone.png?X-Amz-Signature=s3cr3t")}),
        # -- schema (refused at submit)
        Bad("unknown aspect_ratio", 422, ["body", "aspect_ratio"], fields={"aspect_ratio": "4:3"}, at_submit=True),
        Bad("negative steps", 422, ["body", "num_inference_steps"], fields={"num_inference_steps": -5},
            at_submit=True),
        Bad("NaN guidance", 422, ["body", "guidance_scale"], raw=b"NaN", at_submit=True),
        Bad("Infinity audio guidance", 422, ["body", "audio_guidance_scale"], raw=b"Infinity", at_submit=True),
        Bad("prompt of 100 kB", 422, ["body", "prompt"], fields={"prompt": "x" * 100_000}, at_submit=True),
        Bad("image_url is a number", 422, image, fields={"image_url": 123}, at_submit=True),
        Bad("prompt is a list", 422, ["body", "prompt"], fields={"prompt": ["a", "b"]}, at_submit=True),
        Bad("steps is a word", 422, ["body", "num_inference_steps"], fields={"num_inference_steps": "ten"},
            at_submit=True),
        Bad("seed too large", 422, ["body", "seed"], fields={"seed": 2**70}, at_submit=True),
        Bad("empty body", 422, ["body"], raw=b"", at_submit=True),
        Bad("invalid JSON", 422, ["body"], "invalid json", raw=b'{"image_url": ', at_submit=True),
        Bad("JSON array", 422, ["body"], raw=b"[1, 2, 3]", at_submit=True),
        Bad("missing image_url", 422, image, fields={"image_url": None}, at_submit=True),
    ]


def valid_body(files, **extra) -> dict:
    url = files["server"].url
    return {"image_url": url("/portrait.png"), "audio_url": url("/speech.wav"), "prompt": "a person talking",
            "num_inference_steps": 1, "seed": 3, "aspect_ratio": "1:1", **extra}


def encode(case: Bad, files) -> bytes:
    body = valid_body(files)
    if case.raw is not None and case.at_submit and case.raw in (b"NaN", b"Infinity"):
        key = case.loc[-1]
        text = json.dumps({**body, key: 0.5})
        return text.replace(f'"{key}": 0.5', f'"{key}": {case.raw.decode()}').encode()
    if case.raw is not None:
        return case.raw
    body.update(case.fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def post(url: str, data: bytes) -> tuple[int, dict | None]:
    request = urllib.request.Request(url, data=data, method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def temp_entries(folder: str) -> set[str]:
    return {name for name in os.listdir(folder) if name.startswith(TEMP_PREFIXES)}


def check_answer(case: Bad, status: int, body: dict) -> None:
    assert status == case.status, (case.name, status, body)
    detail = body["detail"]
    assert isinstance(detail, list) and detail, (case.name, body)
    assert detail[0]["loc"] == case.loc, (case.name, detail)
    assert case.text.lower() in detail[0]["msg"].lower(), (case.name, detail[0]["msg"])
    assert "Traceback" not in detail[0]["msg"] and "s3cr3t" not in detail[0]["msg"]
    if case.kind is not None:
        assert detail[0]["type"] == case.kind, (case.name, detail[0])


# -- tests ----------------------------------------------------------------------------------------------------


def test_replicas_use_the_private_temp_dir(service):
    import psutil

    replicas = replica_processes(APP_NAME)
    assert set(replicas) == {"Gateway", "Orchestrator", "Preprocessor", "Denoiser", "Postprocessor"}, replicas
    for deployment, pids in replicas.items():
        for pid in pids:
            assert psutil.Process(pid).environ().get("TMPDIR") == service["tmpdir"], (deployment, pid)


def test_catalogue_of_bad_inputs(service, files):
    base = service["base"]
    cases = catalogue(files)
    assert len(cases) >= 30
    before = temp_entries(service["tmpdir"])
    forbidden_seen = len(files["forbidden"].seen)
    started = time.monotonic()

    jobs: dict[str, Bad] = {}
    for case in cases:
        status, body = post(f"{base}/{APP}", encode(case, files))
        if case.at_submit:
            check_answer(case, status, body)
        else:
            assert status == 200, (case.name, body)
            jobs[body["request_id"]] = case

    pending = set(jobs)
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for rid in list(pending):
            code, body, _ = http_json("GET", f"{base}/{APP}/requests/{rid}/status")
            if body["status"] == "COMPLETED":
                pending.discard(rid)
                assert body.get("error") and body.get("error_type") == "validation_error", (jobs[rid].name, body)
        time.sleep(0.1)
    assert not pending, [jobs[rid].name for rid in pending]
    answers = []
    for rid, case in jobs.items():
        code, body, headers = http_json("GET", f"{base}/{APP}/requests/{rid}")
        check_answer(case, code, body)
        answers.append((case.name, code, body["detail"][0]["msg"]))
    elapsed = time.monotonic() - started
    print(f"\n{len(cases)} bad inputs answered in {elapsed:.1f} s")
    for name, code, msg in answers:
        print(f"  {name}: {code} {msg}")

    assert len(files["forbidden"].seen) == forbidden_seen  # no request ever reached 127.0.0.1
    assert temp_entries(service["tmpdir"]) <= before


def test_sync_route_answers_the_same(service, files):
    base = service["base"]
    for case in (Bad("decompression bomb", 413, ["body", "image_url"], "decompression bomb",
                     {"image_url": b64(png_declaring(30000, 30000), "image/png")}),
                 Bad("URL to 169.254.169.254", 422, ["body", "image_url"], "link-local",
                     {"image_url": "http://169.254.169.254/"}),
                 Bad("corrupt mp3", 415, ["body", "audio_url"], "not a recognised audio format",
                     {"audio_url": files["server"].url("/corrupt.mp3")}),
                 Bad("NaN guidance", 422, ["body", "guidance_scale"], raw=b"NaN", at_submit=True)):
        status, body = post(f"{base}/run/{APP}", encode(case, files))
        check_answer(case, status, body)


def test_service_is_healthy_and_the_next_valid_job_succeeds(service, files):
    base = service["base"]
    before = temp_entries(service["tmpdir"])
    code, body, _ = http_json("GET", f"{base}/health")
    assert code == 200 and body["status"] == "ok"
    # Unknown fields are ignored, as on fal.
    extra = {"enable_safety_checker": True, "loras": [{"path": "x"}], "sync_mode": "yes"}
    status, submitted = post(f"{base}/{APP}", json.dumps(valid_body(files, **extra)).encode())
    assert status == 200, submitted
    rid = submitted["request_id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        _, state, _ = http_json("GET", f"{base}/{APP}/requests/{rid}/status")
        if state["status"] == "COMPLETED":
            break
        time.sleep(0.2)
    assert state["status"] == "COMPLETED" and "error" not in state, state
    code, output, _ = http_json("GET", f"{base}/{APP}/requests/{rid}")
    assert code == 200 and output["seed"] == 3
    assert len(http_bytes(output["video"]["url"])) == output["video"]["file_size"]
    assert temp_entries(service["tmpdir"]) <= before
