"""``stable-avatar`` command line: in-process generation, weight download, and a client for a running server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.client import (
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
from pipeline.presets import PRESETS

# Exit codes, so scripts can tell "fix the input" from "fix the key" from "try again later".
EXIT_FAILED = 1  # the job failed on the server, the server is unreachable, or an unknown request id
EXIT_BAD_INPUT = 2  # an input was rejected (argparse, local check, 422, or 413/415 for a media file)
EXIT_AUTH = 3  # the API key is missing (401) or wrong (403)
EXIT_INTERRUPTED = 130  # Ctrl-C
CLIENT_COMMANDS = ("submit", "status", "result")


def _add_generation_inputs(p: argparse.ArgumentParser, where: str, seed_help: str) -> None:
    """The fal input fields, shared by ``generate`` (in process) and ``submit`` (to a server)."""
    p.add_argument("--image", required=True, help=f"reference image: {where}, http(s) URL or data URI")
    p.add_argument("--audio", required=True, help=f"speech audio: {where}, http(s) URL or data URI")
    p.add_argument("--prompt", required=True)
    p.add_argument("--aspect-ratio", default="auto", choices=["auto", "16:9", "9:16", "1:1"])
    p.add_argument("--steps", type=int, default=50, help="denoising steps, 1-100 (default 50)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="text guidance, 0-20 (default 5)")
    p.add_argument("--audio-guidance-scale", type=float, default=4.0, help="audio guidance, 0-20 (default 4)")
    p.add_argument("--seed", type=int, default=None, help=seed_help)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a video in this process (no server)")
    _add_generation_inputs(p, "path", "random seed (default: random)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--checkpoints", type=Path, default=None, help="official checkpoint layout (real preset)")
    p.add_argument("--variant", default="square", choices=["square", "rec-vec"], help="StableAvatar weights")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overlap", type=int, default=None, help="window overlap in latent frames (default 10)")
    p.add_argument("--window-policy", default=None, choices=["full", "upstream"])
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download-weights", help="download the official checkpoints (Hugging Face)")
    p.add_argument("--dir", type=Path, required=True)


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get(SERVER_ENV) or DEFAULT_SERVER,
                   help=f"base URL of the service, with its route prefix if any (default: ${SERVER_ENV} "
                        f"or {DEFAULT_SERVER})")
    p.add_argument("--key", default=None,
                   help=f"API key, sent as 'Authorization: Key <key>' (default: ${KEY_ENV})")
    p.add_argument("--app-id", default=DEFAULT_APP_ID, help=f"fal application id (default {DEFAULT_APP_ID})")


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="send a job to a running server, follow it and download the video")
    _add_generation_inputs(p, "local path (uploaded)", "random seed (default: chosen by the server)")
    p.add_argument("-o", "--output", type=Path, default=None, help="where to write the mp4 (default <id>.mp4)")
    _add_connection(p)

    p = sub.add_parser("status", help="show a submitted job's state, stage, progress and last log lines")
    p.add_argument("request_id")
    p.add_argument("--logs", type=int, default=10, help="how many of the last log lines to show (default 10)")
    _add_connection(p)

    p = sub.add_parser("result", help="wait for a submitted job and download its video")
    p.add_argument("request_id")
    p.add_argument("-o", "--output", type=Path, default=None, help="where to write the mp4 (default <id>.mp4)")
    p.add_argument("--no-wait", action="store_true", help="fail instead of waiting when the job is not done")
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
    state = _client(args).status(args.request_id, logs=True)
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


def run_client(args: argparse.Namespace) -> int:
    """The server commands: errors become one readable line each and an exit code that says what went wrong."""
    from pydantic import ValidationError

    handler = {"submit": run_submit, "status": run_status, "result": run_result}[args.command]
    try:
        return handler(args)
    except ValidationError as exc:  # checked here before anything is uploaded; same shape as the server's 422
        return _fail(ApiError(422, [{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]), args)
    except ApiError as exc:
        return _fail(exc, args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from pipeline.denoise import InProcessExecutor, WindowDenoiser
    from pipeline.generator import GenerationParams, PipelineSettings, StableAvatarPipeline
    from pipeline.inputs import read_source
    from pipeline.loading import load_models
    from pipeline.presets import get_preset
    from pipeline.schema import StableAvatarInput

    fields = StableAvatarInput(
        image_url=str(args.image), audio_url=str(args.audio), prompt=args.prompt, aspect_ratio=args.aspect_ratio,
        guidance_scale=args.guidance_scale, audio_guidance_scale=args.audio_guidance_scale,
        num_inference_steps=args.steps, seed=args.seed,
    )
    image = read_source(fields.image_url, "image_url")
    audio = read_source(fields.audio_url, "audio_url")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(args.preset)
    overrides = {k: v for k, v in {"overlap": args.overlap, "window_policy": args.window_policy}.items() if v}
    settings = PipelineSettings(**overrides)

    started = time.perf_counter()
    models = load_models(preset, checkpoints=args.checkpoints, device=device, variant=args.variant)
    load_s = time.perf_counter() - started
    pipeline = StableAvatarPipeline(models, settings)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"  {msg}", file=sys.stderr))
    params = GenerationParams(
        prompt=fields.prompt, aspect_ratio=fields.aspect_ratio, guidance_scale=fields.guidance_scale,
        audio_guidance_scale=fields.audio_guidance_scale, num_inference_steps=fields.num_inference_steps,
        seed=fields.seed,
    )
    prepared = pipeline.prepare(image, audio, params, progress=log)
    total = prepared.plan.num_windows * params.num_inference_steps
    with tqdm(total=total, unit="window-step", disable=args.quiet, file=sys.stderr) as bar:
        executor = InProcessExecutor(WindowDenoiser(models.transformer), prepared.conditioning,
                                     on_window_step=lambda _w: bar.update(1))
        latents = asyncio.run(pipeline.denoise(prepared, executor))
    result = pipeline.finish(prepared, latents, args.output, progress=log)

    timings = {"load": load_s, **result.timings}
    print(f"wrote {result.path} ({result.width}x{result.height}, {result.frames} frames, "
          f"{result.frames / 25:.2f} s, {result.file_size} bytes, seed {prepared.seed})")
    if preset.is_random:
        print(f"note: preset {preset.name!r} has random weights, so the video is noise")
    print("stage summary: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from deployments.launcher import serve_main

    return serve_main(args.config)


def run_download(args: argparse.Namespace) -> int:
    from pipeline.weights import download_weights

    download_weights(args.dir)
    print(f"downloaded the official checkpoint layout into {args.dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stable-avatar", description="StableAvatar talking-avatar videos")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_download(sub)
    _add_client(sub)
    serve = sub.add_parser("serve", help="run the service locally (Ray Serve) from a Serve config file")
    serve.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("STABLE_AVATAR_LOG_LEVEL", "WARNING"))
    args = build_parser().parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        return run_client(args)  # before the imports below: they pull in torch, which a client does not need

    from pydantic import ValidationError

    from pipeline.keymaps import CheckpointKeyError
    from pipeline.loading import CheckpointNotFoundError
    from pipeline.media.errors import MediaError

    handlers = {"generate": run_generate, "download-weights": run_download, "serve": run_serve}
    try:
        return handlers[args.command](args)
    except MediaError as exc:
        print(f"error: {exc.field}: {exc}", file=sys.stderr)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"error: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}", file=sys.stderr)
    except (CheckpointNotFoundError, CheckpointKeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
