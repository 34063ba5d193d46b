"""The OFFICIAL Python ``fal-client`` 1.0.3 over HTTPS, set up the documented way: environment variables only
(``FAL_RUN_HOST``/``FAL_QUEUE_RUN_HOST``, trusted through ``SSL_CERT_FILE``), against Ray Serve's own TLS
(``http_options`` ``ssl_keyfile``/``ssl_certfile``) with a certificate authority this module creates.

That is how a user points unmodified code at the service, so the URLs the server hands back must be absolute
``https://`` URLs on the host the client called. Uploads also patch ``REST_URL``/``CDN_URL`` (the client has no
environment variable for them). Plain HTTP and the JS client: tests/test_fal_clients.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testing.ray_serve import ray_serve_cluster
from tests.test_fal_clients import (
    APP,
    assert_field_error,
    assert_subscribe_updates,
    assert_video,
    deploy_service,
    make_media,
    run_python_client,
    same_output,
)
from tests.tls import make_certificates

pytestmark = pytest.mark.serve  # a cluster of its own: Serve's proxy speaks HTTPS for the whole cluster


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict[str, Any]:
    ca, key, cert = make_certificates(tmp_path_factory.mktemp("tls"))
    return {"ca": ca, "key": key, "cert": cert, "context": ssl.create_default_context(cafile=str(ca))}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    return make_media(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tls) -> Iterator[str]:
    with ray_serve_cluster(ssl_files=(tls["key"], tls["cert"])) as cluster:
        yield deploy_service(cluster, tmp_path_factory.mktemp("storage"), "https")


def python_https(scenario: str, media: dict[str, Path], base: str, tls: dict[str, Any],
                 run_host: str | None = None, *extra: str) -> dict[str, Any]:
    """The client configured by environment only; ``run_host`` defaults to the queue host."""
    host = base.removeprefix("https://")
    env = {"FAL_RUN_HOST": run_host or host, "FAL_QUEUE_RUN_HOST": host, "SSL_CERT_FILE": str(tls["ca"])}
    return run_python_client(scenario, media, env, *extra)


def test_subscribe_with_logs(server, tls, media, tmp_path):
    line = python_https("subscribe", media, server, tls)
    assert_subscribe_updates(line["types"])
    in_progress = [u for u in line["updates"] if u["type"] == "InProgress"]
    assert in_progress and all(u["logs"] for u in in_progress), line["updates"]
    assert {"message", "level", "source", "timestamp"} <= set(in_progress[0]["log_keys"])
    assert_video(line["result"], server, tmp_path, tls["context"])


def test_submit_status_result_urls_are_absolute_https(server, tls, media, tmp_path):
    line = python_https("queue", media, server, tls)
    root = f"{server}/{APP}/requests/{line['request_id']}"
    assert (line["response_url"], line["status_url"], line["cancel_url"]) == (root, f"{root}/status",
                                                                               f"{root}/cancel")
    assert line["rebuilt_equal"]  # fal's own invariant: get_handle() == the handle submit() returned
    assert all(p["logs"] is None for p in line["polled"] if p["type"] != "Queued"), line["polled"]
    assert line["polled"][-1]["type"] == "Completed"
    assert line["with_logs"]["type"] == "Completed" and line["with_logs"]["logs"] > 0
    assert line["with_logs"]["metrics"]["inference_time"] > 0
    assert line["status_by_id"] == "Completed" and same_output(line["result"], line["result_by_id"])
    assert_video(line["result"], server, tmp_path, tls["context"])


def test_cancel_queued_and_completed(server, tls, media):
    line = python_https("cancel", media, server, tls)
    # The first job runs (one at a time), so the middle one is next and the last one has the middle one ahead.
    assert line["first_running"] == "InProgress", line
    assert (line["middle_before"], line["middle_position"], line["last_position_before"]) == ("Queued", 0, 1), line
    assert line["middle_after"] == {"type": "Completed", "error": "Request cancelled",
                                    "error_type": "client_cancelled"}
    assert line["last_position_after"] == 0, line
    cancelled = line["cancelled_result"]
    assert cancelled["status_code"] == 499 and cancelled["error_type"] == "client_cancelled", cancelled
    assert line["first_final_error_type"] == "client_cancelled", line  # the running job, cancelled
    completed = line["cancel_completed"]
    assert completed["raised"] == "FalClientHTTPError" and completed["status_code"] == 400, completed
    assert line["cancel_unknown"]["status_code"] == 404
    assert line["last_result_has_video"]


def test_priority_hint_and_start_timeout_take_effect(server, tls, media):
    line = python_https("priority", media, server, tls)
    assert line["positions"] == {"late": 0, "normal": 1, "low": 2}, line["positions"]
    # The job that could not start within its 10 s failed with fal's timeout while the blocker (20 s of speech at
    # 100 steps: far longer than 10 s on CPU, and cancelled below) still ran.
    assert line["blocker_while_late_failed"] == "InProgress", line
    assert line["late_status"]["error_type"] == "request_timeout", line["late_status"]
    late = line["late_result"]
    assert late["raised"] == "FalClientHTTPError" and late["status_code"] == 504, late
    assert late["timeout_type"] == "user" and late["error_type"] == "request_timeout", late
    # The blocker is cancelled while it runs, or it had just finished: nothing else is an answer to that cancel.
    cancel = line["blocker_cancel"]
    assert cancel["raised"] is None or (cancel["status_code"] == 400 and "ALREADY_COMPLETED" in cancel["message"]), cancel
    assert line["normal_has_video"]


def test_upload_file_then_use_the_urls(server, tls, media, tmp_path):
    line = python_https("upload", media, server, tls, None, "--rest-base", server)
    for url in line["urls"].values():
        assert url.startswith(f"{server}/files/uploads/"), line["urls"]
    assert line["round_trip_equal"]
    assert_video(line["result"], server, tmp_path, tls["context"])


def test_validation_error_names_the_field(server, tls, media):
    line = python_https("validation", media, server, tls)
    assert_field_error(line["zero_steps"], "num_inference_steps")
    assert_field_error(line["missing_prompt"], "prompt")


def test_sync_run_through_fal_run_host(server, tls, media, tmp_path):
    """``FAL_RUN_HOST=127.0.0.1:PORT/run``: run() posts to the sync route, not to the queue submit route."""
    line = python_https("run", media, server, tls, server.removeprefix("https://") + "/run")
    assert line["run_url"] == f"{server}/run/"
    assert_video(line["result"], server, tmp_path, tls["context"])
