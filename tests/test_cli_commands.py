"""The ``stable-avatar`` command line without a server or Ray: what each command loads, its help, ``--version``,
``serve --host/--port`` and the new client commands' arguments. Each command runs in a fresh interpreter, as a
user runs it (``tests/cli_probe.py``)."""

from __future__ import annotations

import argparse
import json
import tomllib

import pytest
import yaml

from bench.bench_imports import measure
from stable_avatar import client_commands
from stable_avatar.arguments import EXAMPLES_HEADING
from stable_avatar.cli import build_parser
from stable_avatar.serve_command import listen_on
from testing.http import free_port
from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE, REPO_ROOT
from tests.cli_probe import run_cli

REQUEST_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def nowhere() -> str:
    """A server URL where nothing listens (a port just bound and released)."""
    return f"http://127.0.0.1:{free_port()}"


def test_version_is_the_projects():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    run = run_cli(["--version"], REPO_ROOT)
    assert run.exit_code == 0 and run.stdout.strip() == f"stable-avatar {project['version']}"
    assert run.model_libraries == []


def test_the_cli_module_loads_no_model_library():
    assert measure("stable_avatar.cli", REPO_ROOT)["model_libraries"] == []


@pytest.mark.parametrize("args", [
    ["--help"], ["submit", "--help"], ["status", "--help"], ["cancel", "--help"], ["serve", "--help"],
    ["generate", "--help"], ["jobs", "--help"], ["jobs", "requeue", "--help"],
], ids=" ".join)
def test_help_loads_no_model_library_and_no_ray(args):
    run = run_cli(args, REPO_ROOT)
    assert run.exit_code == 0 and "usage: stable-avatar" in run.stdout and EXAMPLES_HEADING in run.stdout
    assert run.loaded == []


@pytest.mark.parametrize("command", [
    ["status", REQUEST_ID], ["status", REQUEST_ID, "--json"], ["result", REQUEST_ID, "--no-wait"],
    ["cancel", REQUEST_ID],
    ["submit", "--image", str(EXAMPLE_IMAGE), "--audio", str(EXAMPLE_AUDIO), "--prompt", "a person talking"],
], ids=lambda command: " ".join(a for a in command if a != REQUEST_ID and "/" not in a))
def test_client_commands_load_no_model_library(command, nowhere):
    """Run to the end (here: the server cannot be reached, exit status 1 with one line saying so)."""
    run = run_cli([*command, "--server", nowhere], REPO_ROOT)
    assert run.exit_code == 1, run.stderr
    assert f"error: could not reach the server at {nowhere}/" in run.stderr and "Traceback" not in run.stderr
    assert run.loaded == []


def test_the_probe_sees_a_command_that_loads_torch(tmp_path):
    """``generate`` loads the model code before it reads its inputs: the probe must see that."""
    run = run_cli(["generate", "--image", str(tmp_path / "missing.png"), "--audio", str(EXAMPLE_AUDIO),
                   "--prompt", "x", "-o", str(tmp_path / "out.mp4")], REPO_ROOT)
    assert run.exit_code == 2 and "error: image_url:" in run.stderr, run.stderr
    assert "torch" in run.model_libraries


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_has_a_description_and_an_example_and_every_option_a_help():
    parser = build_parser()
    commands = _commands(parser)
    assert set(commands) == {"generate", "download-weights", "serve", "submit", "status", "result", "cancel", "jobs"}
    jobs = {f"jobs {name}": command for name, command in _commands(commands["jobs"]).items()}
    assert set(jobs) == {"jobs dead-letters", "jobs requeue", "jobs retarget"}
    missing = []
    for name, command in {"stable-avatar": parser, **commands, **jobs}.items():
        if not (command.description or "").strip():
            missing.append(f"{name}: description")
        example = "stable-avatar" if name == "stable-avatar" else f"stable-avatar {name}"
        if not (command.epilog or "").startswith(EXAMPLES_HEADING) or example not in command.epilog:
            missing.append(f"{name}: an example")
        missing += [f"{name} {action.dest}: help" for action in command._actions
                    if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()]
    assert missing == []


def test_cancel_and_status_json_are_client_commands():
    parser = build_parser()
    cancel = parser.parse_args(["cancel", REQUEST_ID, "--server", "http://gpu-box:8000", "--key", "k"])
    assert (cancel.command, cancel.request_id, cancel.server, cancel.key) == ("cancel", REQUEST_ID,
                                                                              "http://gpu-box:8000", "k")
    assert cancel.handler is client_commands.run
    status = parser.parse_args(["status", REQUEST_ID, "--json", "--logs", "0"])
    assert status.json is True and status.logs == 0 and status.handler is client_commands.run
    assert parser.parse_args(["status", REQUEST_ID]).json is False
    with pytest.raises(SystemExit) as refused:
        parser.parse_args(["cancel"])  # the request id is required
    assert refused.value.code == 2


def test_serve_host_and_port_options():
    parser = build_parser()
    args = parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "9000", "--config", "x.yaml"])
    assert (args.host, args.port, str(args.config)) == ("0.0.0.0", 9000, "x.yaml")
    defaults = parser.parse_args(["serve"])
    assert (defaults.host, defaults.port, str(defaults.config)) == (None, None, "serve_config.yaml")
    for bad in ("0", "65536", "http"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--port", bad])


def shipped_config() -> dict:
    return yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())


def test_host_and_port_replace_the_configs_and_its_own_links_follow():
    config = shipped_config()
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}  # what the cases below start from
    moved = listen_on(config, None, 9000)
    assert moved["http_options"] == {"host": "127.0.0.1", "port": 9000}
    assert moved["applications"][0]["args"]["storage"]["public_base_url"] == "http://127.0.0.1:9000"
    assert config == shipped_config()  # the loaded config is not changed in place

    everywhere = listen_on(config, "0.0.0.0", 9001)
    assert everywhere["http_options"] == {"host": "0.0.0.0", "port": 9001}
    # a browser on this machine cannot open 0.0.0.0: links keep the loopback address
    assert everywhere["applications"][0]["args"]["storage"]["public_base_url"] == "http://127.0.0.1:9001"

    assert listen_on(config, None, None) == config


def test_links_follow_the_port_over_https_when_the_config_has_a_certificate():
    config = shipped_config()
    config["http_options"] |= {"ssl_keyfile": "key.pem", "ssl_certfile": "cert.pem"}
    config["applications"][0]["args"]["storage"]["public_base_url"] = "https://127.0.0.1:8000"
    moved = listen_on(config, None, 9443)
    assert moved["applications"][0]["args"]["storage"]["public_base_url"] == "https://127.0.0.1:9443"
    assert moved["http_options"]["ssl_certfile"] == "cert.pem"


def test_links_to_another_address_or_to_s3_stay_as_configured():
    config = shipped_config()
    storage = config["applications"][0]["args"]["storage"]
    storage["public_base_url"] = "https://avatar.example.com"
    assert listen_on(config, "10.0.0.5", 9000)["applications"][0]["args"]["storage"] == storage
    config["applications"][0]["args"]["storage"] = s3 = {"kind": "s3", "bucket": "b",
                                                          "public_base_url": "http://127.0.0.1:8000"}
    assert listen_on(config, None, 9000)["applications"][0]["args"]["storage"] == s3
    assert listen_on({"applications": []}, None, 9000)["http_options"] == {"port": 9000}


def test_serve_refuses_a_bad_config_before_starting_ray(tmp_path):
    config = shipped_config()
    config["applications"][0]["args"]["retention"]["results_s"] = -1
    config["applications"][0]["args"]["stepz"] = 3
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    run = run_cli(["serve", "--config", str(path), "--port", "9000"], REPO_ROOT)
    assert run.exit_code == 2, run.stderr
    assert f"error: --config {path}: application 'stable-avatar': args.retention.results_s:" in run.stderr
    assert "args.stepz: Extra inputs are not permitted" in run.stderr
    assert "ray" not in run.loaded

    run = run_cli(["serve", "--config", str(tmp_path / "missing.yaml")], REPO_ROOT)
    assert run.exit_code == 2 and f"error: --config {tmp_path / 'missing.yaml'}: No such file" in run.stderr


def test_serve_refuses_missing_weights_and_bad_serve_options_before_starting_a_cluster(tmp_path):
    """The one-GPU example whose ``checkpoints`` folder holds no weights stops at once naming the file it looked
    for, not after Ray has started and every model replica failed; a Serve option that Serve would refuse (TLS with
    a certificate but no key) is named the same way."""
    config = yaml.safe_load((REPO_ROOT / "examples" / "serve_config.one-gpu.yaml").read_text())
    config["applications"][0]["args"]["checkpoints"] = str(tmp_path / "weights")
    path = tmp_path / "one-gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    run = run_cli(["serve", "--config", str(path)], REPO_ROOT)
    assert run.exit_code == 2, run.stderr
    assert (f"error: --config {path}: application 'stable-avatar': args.checkpoints: base transformer weights not "
            f"found in {tmp_path / 'weights' / 'Wan2.1-Fun-V1.1-1.3B-InP'}") in run.stderr
    assert "stable-avatar download-weights" in run.stderr

    config["http_options"]["ssl_certfile"] = str(tmp_path / "server.pem")
    path.write_text(yaml.safe_dump(config))
    run = run_cli(["serve", "--config", str(path)], REPO_ROOT)
    assert run.exit_code == 2 and f"error: --config {path}: http_options.ssl_certfile:" in run.stderr, run.stderr


def test_jobs_commands_list_requeue_and_retarget_loading_no_model_library(tmp_path):
    """The operator's commands read the Serve config's jobs database (here its default SQLite file beside the
    local storage), in a fresh interpreter that loads neither a model library nor Ray."""
    from deployments.jobstore import (
        DEFAULT_SQLITE_NAME,
        JobError,
        JobLimits,
        SqliteJobsConfig,
        make_sync_job_store,
    )

    root = tmp_path / "data"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "stable-avatar", "args": {
        "storage": {"kind": "local", "root": str(root)}}}]}))
    store = make_sync_job_store(SqliteJobsConfig(), root / DEFAULT_SQLITE_NAME, JobLimits(max_attempts=1))
    try:
        job_input = {"request": {"prompt": "hi"}, "stored": {}}
        dead = store.submit(app_id="a", input=job_input, seed=1, owner="k1", rate_limited=False).request_id
        claimed = store.claim("runner-a", 30)
        store.retry(dead, claimed.epoch, error=JobError(status_code=503, detail="x", message="storage fault "
                                                        "(StorageError)"), error_class="storage")
        queued = store.submit(app_id="a", input=job_input, seed=2, owner="k1", rate_limited=False,
                              model_fingerprint="old-model").request_id

        listed = run_cli(["jobs", "dead-letters", "--config", str(config)], REPO_ROOT)
        assert listed.exit_code == 0 and listed.loaded == [], listed.stderr
        assert dead in listed.stdout and "gave up after 1 attempts" in listed.stdout
        assert "attempt 1 (epoch 1) on runner-a" in listed.stdout and "retried (storage: storage fault" in \
            listed.stdout
        as_json = json.loads(run_cli(["jobs", "dead-letters", "--json", "--config", str(config)], REPO_ROOT).stdout)
        assert [(d["job"]["request_id"], [a["outcome"] for a in d["attempts"]]) for d in as_json] == \
            [(dead, ["retried"])]

        requeued = run_cli(["jobs", "requeue", dead, "--config", str(config)], REPO_ROOT)
        assert requeued.exit_code == 0 and f"re-queued {dead}" in requeued.stdout, requeued.stderr
        assert store.get(dead, "k1").status == "IN_QUEUE" and store.dead_letters() == []
        again = run_cli(["jobs", "requeue", dead, "--config", str(config)], REPO_ROOT)
        assert again.exit_code == 1 and "is not a dead letter" in again.stderr

        moved = run_cli(["jobs", "retarget", "old-model", "new-model", "--config", str(config)], REPO_ROOT)
        assert moved.exit_code == 0 and "moved 1 queued jobs" in moved.stdout and moved.loaded == []
        assert store.get(queued, "k1").model_fingerprint == "new-model"

        missing = run_cli(["jobs", "dead-letters", "--config", str(config), "--app", "other"], REPO_ROOT)
        assert missing.exit_code == 2 and "no application 'other'" in missing.stderr
    finally:
        store.close()
