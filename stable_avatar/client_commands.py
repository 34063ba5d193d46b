"""``stable-avatar submit|status|result|cancel``: drive a running server over the fal queue protocol.

Client commands import no model library: a laptop that only talks to a GPU server needs neither torch nor its
start-up time (``tests/test_cli_commands.py`` checks it in a fresh interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stable_avatar.arguments import add_acceleration, add_command, add_generation_inputs
from stable_avatar.client import (
    DEFAULT_APP_ID,
    DEFAULT_SERVER,
    KEY_ENV,
    REMOTE_PREFIXES,
    SERVER_ENV,
    ApiError,
    AvatarClient,
    Status,
    follow,
    format_log,
)
from stable_avatar.exit_codes import EXIT_AUTH, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED

SERVER_NOTE = (f"The server is --server (default: ${SERVER_ENV}, else {DEFAULT_SERVER}); the API key is --key "
               f"(default: ${KEY_ENV}).")


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get(SERVER_ENV) or DEFAULT_SERVER,
                   help=f"base URL of the service, with its route prefix if any (default: ${SERVER_ENV} "
                        f"or {DEFAULT_SERVER})")
    p.add_argument("--key", default=None,
                   help=f"API key, sent as 'Authorization: Key <key>' (default: ${KEY_ENV})")
    p.add_argument("--app-id", default=DEFAULT_APP_ID, help=f"fal application id (default {DEFAULT_APP_ID})")


def _add_job_command(sub: argparse._SubParsersAction, name: str, summary: str, description: str,
                     examples: list[str]) -> argparse.ArgumentParser:
    """A command about one submitted job: its REQUEST_ID argument first, the connection options added last."""
    p = add_command(sub, name, summary, f"{description} {SERVER_NOTE}", examples)
    p.set_defaults(handler=run)
    p.add_argument("request_id", metavar="REQUEST_ID", help="the id that submit printed (32 hex digits)")
    return p


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "submit", "send a job to a running server, follow it and download the video",
                    "Upload local files, submit the job to the queue, show its queue position, progress bar and "
                    "log lines, then download the video. Ctrl-C asks whether to cancel the job (without a "
                    f"terminal it leaves the job running and prints how to come back). {SERVER_NOTE}",
                    ["stable-avatar submit --image face.png --audio speech.wav --prompt 'A person talking' "
                     "-o out.mp4",
                     "stable-avatar submit --server https://avatar.example.com --key $KEY --image face.png \\",
                     "    --audio https://example.com/speech.mp3 --prompt 'A man talking' --aspect-ratio 9:16 "
                     "--acceleration high"])
    p.set_defaults(handler=run)
    add_generation_inputs(p, "local path (uploaded)", "random seed (default: chosen by the server)")
    add_acceleration(p, "step cache level: none, regular, high (default: the server's)")
    p.add_argument("-o", "--output", type=Path, default=None, help="where to write the mp4 (default <id>.mp4)")
    _add_connection(p)

    p = _add_job_command(sub, "status", "show a submitted job's state, stage, progress and last log lines",
                         "Ask the server once where a job is: IN_QUEUE (with its position), IN_PROGRESS (stage "
                         "and progress) or COMPLETED (with its error, if it failed).",
                         ["stable-avatar status REQUEST_ID --logs 20",
                          "stable-avatar status REQUEST_ID --json | jq -r .status"])
    p.add_argument("--logs", type=int, default=10, help="how many of the last log lines to show (default 10)")
    p.add_argument("--json", action="store_true",
                   help="print the server's status answer as JSON instead (all its log lines unless --logs 0)")
    _add_connection(p)

    p = _add_job_command(sub, "result", "wait for a submitted job and download its video",
                         "Follow the job until it completes, then download its video. A job that failed exits "
                         "with its error.",
                         ["stable-avatar result REQUEST_ID -o out.mp4",
                          "stable-avatar result REQUEST_ID --no-wait    # fail at once if it is not done"])
    p.add_argument("-o", "--output", type=Path, default=None, help="where to write the mp4 (default <id>.mp4)")
    p.add_argument("--no-wait", action="store_true", help="fail instead of waiting when the job is not done")
    _add_connection(p)

    p = _add_job_command(sub, "cancel", "cancel a queued or running job",
                         "A queued job is cancelled at once; a running one stops at its next step and frees its "
                         "GPUs. Its status then reads COMPLETED with error_type client_cancelled. Exit status 1 "
                         "when the job had already finished.",
                         ["stable-avatar cancel REQUEST_ID",
                          "stable-avatar cancel REQUEST_ID --server http://gpu-box:8000 --key $KEY"])
    _add_connection(p)


def _client(args: argparse.Namespace) -> AvatarClient:
    return AvatarClient(args.server, key=args.key or os.environ.get(KEY_ENV), app_id=args.app_id)


def _again(args: argparse.Namespace, request_id: str) -> str:
    """The commands that pick the job up again (with the options that differ from the defaults)."""
    opts = "" if args.server == DEFAULT_SERVER else f" --server {args.server}"
    opts += "" if args.app_id == DEFAULT_APP_ID else f" --app-id {args.app_id}"
    return (f"  stable-avatar status {request_id}{opts}\n"
            f"  stable-avatar result {request_id}{opts} -o {request_id}.mp4")


def _download(client: AvatarClient, request_id: str, state: Status | None, out: Path | None) -> int:
    """Fetch the result (a failed job raises its error) and write the video."""
    output = client.result(request_id)
    if output is None:
        print(f"error: request {request_id} is not finished yet ({state.status if state else 'running'})",
              file=sys.stderr)
        return EXIT_FAILED
    target = out or Path(f"{request_id}.mp4")
    size = client.download(output["video"]["url"], target)
    print(f"wrote {target} ({size} bytes, seed {output.get('seed')})")
    return 0


def _interrupted(client: AvatarClient, args: argparse.Namespace, request_id: str) -> int:
    """Ctrl-C while following: ask whether to cancel (only when someone can answer), else say how to come back."""
    print(file=sys.stderr)
    if sys.stdin is not None and sys.stdin.isatty():
        sys.stderr.write("Cancel the job? [y/N] ")
        sys.stderr.flush()
        try:
            answer = sys.stdin.readline().strip().lower()
        except (KeyboardInterrupt, EOFError):
            answer = ""
        if answer in ("y", "yes"):
            outcome = client.cancel(request_id)
            if outcome == "CANCELLATION_REQUESTED":
                print(f"cancellation requested for {request_id}", file=sys.stderr)
            else:
                print(f"the job {request_id} had already finished; fetch it with:\n{_again(args, request_id)}",
                      file=sys.stderr)
            return EXIT_INTERRUPTED
    print(f"interrupted; the job {request_id} keeps running on the server. Come back with:\n"
          f"{_again(args, request_id)}", file=sys.stderr)
    return EXIT_INTERRUPTED


def run_submit(args: argparse.Namespace) -> int:
    from pipeline.schema import StableAvatarInput

    client = _client(args)
    payload = {"image_url": args.image, "audio_url": args.audio, "prompt": args.prompt,
               "aspect_ratio": args.aspect_ratio, "num_inference_steps": args.steps,
               "guidance_scale": args.guidance_scale, "audio_guidance_scale": args.audio_guidance_scale}
    if args.seed is not None:
        payload["seed"] = args.seed
    if args.acceleration is not None:
        payload["acceleration"] = args.acceleration
    StableAvatarInput.model_validate(payload)  # same rules as the server: fail before uploading anything
    for name, option in (("image_url", "--image"), ("audio_url", "--audio")):
        ref = payload[name]
        if not ref.startswith(REMOTE_PREFIXES):
            if not Path(ref).expanduser().is_file():
                print(f"error: {option}: no such file: {ref}", file=sys.stderr)
                return EXIT_BAD_INPUT
            print(f"uploading {ref}", file=sys.stderr)
        payload[name] = client.resolve(ref)
    submitted = client.submit(payload)
    request_id = submitted["request_id"]
    try:  # from here on a Ctrl-C concerns a job that exists: offer to cancel it
        print(f"request id: {request_id}", flush=True)
        print(f"queued at position {submitted.get('queue_position', 0)}", file=sys.stderr)
        state = follow(client, request_id)
    except KeyboardInterrupt:
        return _interrupted(client, args, request_id)
    return _download(client, request_id, state, args.output)


def run_status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.json:
        print(json.dumps(client.status_body(args.request_id, logs=args.logs > 0), indent=2))
        return 0
    state = client.status(args.request_id, logs=True)
    print(f"request:  {args.request_id}")
    print(f"status:   {state.status}")
    if state.queue_position is not None:
        print(f"queue:    position {state.queue_position}")
    print(f"stage:    {state.stage or '-'}")
    print(f"progress: {state.fraction * 100:.0f}%")
    if state.error:
        print(f"error:    {state.error} ({state.error_type or 'error'})")
    if state.logs and args.logs > 0:
        print("logs:")
        for entry in state.logs[-args.logs:]:
            print(format_log(entry))
    return 0


def run_result(args: argparse.Namespace) -> int:
    client = _client(args)
    state = client.status(args.request_id, logs=False)
    if not state.done and not args.no_wait:
        try:
            state = follow(client, args.request_id, show_logs=False)
        except KeyboardInterrupt:
            print(f"\ninterrupted; come back with:\n{_again(args, args.request_id)}", file=sys.stderr)
            return EXIT_INTERRUPTED
    return _download(client, args.request_id, state, args.output)


def run_cancel(args: argparse.Namespace) -> int:
    outcome = _client(args).cancel(args.request_id)
    if outcome == "CANCELLATION_REQUESTED":
        print(f"cancellation requested for {args.request_id}")
        return 0
    print(f"error: request {args.request_id} had already finished ({outcome}); nothing to cancel. Its result:\n"
          f"{_again(args, args.request_id)}", file=sys.stderr)
    return EXIT_FAILED


def _fail(exc: ApiError, args: argparse.Namespace) -> int:
    if exc.status == 404 and getattr(args, "request_id", None):
        print(f"error: no request {args.request_id} on {args.server} ({exc.describe()})", file=sys.stderr)
        return EXIT_FAILED
    for line in exc.lines():
        print(f"error: {line}", file=sys.stderr)
    if exc.status in (401, 403):
        return EXIT_AUTH
    # 422, and 413/415 for media that is too large or not an image/audio: the input must change
    return EXIT_BAD_INPUT if exc.status == 422 or (exc.status < 500 and exc.field_errors()) else EXIT_FAILED


HANDLERS = {"submit": run_submit, "status": run_status, "result": run_result, "cancel": run_cancel}


def run(args: argparse.Namespace) -> int:
    """The server commands: errors become one readable line each and an exit code that says what went wrong."""
    from pydantic import ValidationError

    try:
        return HANDLERS[args.command](args)
    except ValidationError as exc:  # checked here before anything is uploaded; same shape as the server's 422
        return _fail(ApiError(422, [{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]), args)
    except ApiError as exc:
        return _fail(exc, args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
