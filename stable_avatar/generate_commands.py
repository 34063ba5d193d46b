"""``stable-avatar generate`` (in process, no server) and ``stable-avatar download-weights``.

Declaring the commands imports no model library (so ``stable-avatar --help`` and the client commands stay fast);
running them does."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from pipeline.presets import PRESETS
from pipeline.settings import MEMORY_MODE_PEAKS_GB
from stable_avatar.arguments import add_acceleration, add_command, add_generation_inputs
from stable_avatar.errors import print_error, print_validation_error
from stable_avatar.exit_codes import EXIT_BAD_INPUT

DEFAULT_PRESET, REAL_PRESET = "tiny", "stableavatar-1.3b"
MEMORY_MODE_HELP = (
    "where the weights live: full (default), model_offload, block_offload, fp8_weights, or an offload mode "
    "+fp8_weights (e.g. block_offload+fp8_weights). Estimated peak GPU memory for a 5 s 480x832 clip: "
    + ", ".join(f"{mode} {gb:.1f} GB" for mode, gb in MEMORY_MODE_PEAKS_GB.items())
    + "; with --text-encoder-device cpu, less again (docs/gpu.md). Each offload costs speed: model_offload moves "
    "each model once per stage, block_offload streams the DiT's blocks every step")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_generate(sub)
    _add_download(sub)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "generate", "generate a video in this process (no server)",
                    "Run the whole pipeline in this process: load the models, denoise, encode an mp4. The same "
                    "loop and settings as the service, so the same inputs and seed give the same bytes.",
                    ["stable-avatar generate --image examples/portrait.png --audio examples/speech.wav \\",
                     "    --prompt 'A person talking' -o out.mp4          # tiny preset: random weights, noise",
                     "stable-avatar generate --preset stableavatar-1.3b --checkpoints checkpoints \\",
                     "    --image face.jpg --audio speech.mp3 --prompt 'A woman talking' --aspect-ratio 9:16 "
                     "-o out.mp4"])
    p.set_defaults(handler=run)
    add_generation_inputs(p, "path", "random seed (default: random)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help=f"model: tiny (random weights, seconds on a CPU), {REAL_PRESET} (the official weights, "
                        f"needs --checkpoints), stableavatar-1.3b-random (real sizes, random weights); default: "
                        f"{REAL_PRESET} with --checkpoints, else {DEFAULT_PRESET}")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help=f"official checkpoint layout (selects preset {REAL_PRESET}; a random-weights preset "
                        "refuses it)")
    p.add_argument("--variant", default="square", choices=["square", "rec-vec"], help="StableAvatar weights")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype-policy", default="auto", choices=["auto", "gpu", "fp32"],
                   help="auto: bf16 DiT/T5 on a GPU, fp32 on the CPU; gpu: the GPU dtypes anywhere; fp32: all fp32")
    p.add_argument("--overlap", type=int, default=None, help="window overlap in latent frames (default 10)")
    p.add_argument("--window-policy", default=None, choices=["full", "upstream"],
                   help="full: every window full length, audio padded (default); upstream: upstream's shorter "
                        "last window, needs at least 3.4 s of audio")
    p.add_argument("--pipeline-config", type=Path, default=None,
                   help="YAML/JSON file with the service's 'pipeline:' block (PipelineSettings); flags override it")
    p.add_argument("--split-guidance-rows", action="store_true", default=None,
                   help="run the three guidance rows of a window-step as separate forwards (as the service with "
                        "pipeline.split_guidance_rows)")
    add_acceleration(p, "step cache level (default: the pipeline config's, else none)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the DiT's blocks")
    p.add_argument("--memory-mode", default=None, metavar="MODE", help=MEMORY_MODE_HELP)
    p.add_argument("--text-encoder-device", default=None, choices=["auto", "cpu"],
                   help="cpu: keep and run T5 on the CPU (11.4 GB less GPU memory; slower for each new prompt)")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the mp4")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "download-weights", "download the official checkpoints (Hugging Face)",
                    "Fetch the files inference reads from the Hugging Face repository FrancisRing/StableAvatar "
                    "(about 27-36 GB) into the official layout that --checkpoints and the service's "
                    "'checkpoints:' read.",
                    ["stable-avatar download-weights --dir checkpoints --variant square",
                     "stable-avatar generate --preset stableavatar-1.3b --checkpoints checkpoints ..."])
    p.set_defaults(handler=run)
    p.add_argument("--dir", type=Path, required=True, help="folder to download into (created if missing)")
    p.add_argument("--variant", default="all", choices=["square", "rec-vec", "all"],
                   help="StableAvatar transformer weights to fetch (each file is several GB; generate and serve "
                        "use 'square' unless told otherwise; default: all)")


def run(args: argparse.Namespace) -> int:
    """Run ``generate`` or ``download-weights``; bad input is one line naming the field and exit status 2."""
    from pydantic import ValidationError

    from guarded_fetch import InputError
    from pipeline.keymaps import CheckpointKeyError
    from pipeline.loading import CheckpointNotFoundError

    try:
        return HANDLERS[args.command](args)
    except InputError as exc:
        print_error(f"{exc.field}: {exc}")
    except ValidationError as exc:
        print_validation_error(exc)
    except (CheckpointNotFoundError, CheckpointKeyError, ValueError) as exc:
        print_error(str(exc))
    return EXIT_BAD_INPUT


def run_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from pipeline.denoise import InProcessExecutor
    from pipeline.generator import GenerationParams, StableAvatarPipeline
    from pipeline.inputs import read_source
    from pipeline.loading import load_models
    from pipeline.presets import get_preset
    from pipeline.schema import StableAvatarInput
    from pipeline.step_cache import StepCache
    from pipeline.windows import FPS

    fields = StableAvatarInput(
        image_url=str(args.image), audio_url=str(args.audio), prompt=args.prompt, aspect_ratio=args.aspect_ratio,
        guidance_scale=args.guidance_scale, audio_guidance_scale=args.audio_guidance_scale,
        num_inference_steps=args.steps, seed=args.seed, acceleration=args.acceleration,
    )
    image = read_source(fields.image_url, "image_url")
    audio = read_source(fields.audio_url, "audio_url")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(choose_preset(args))
    settings = pipeline_settings(args)

    started = time.perf_counter()
    models = load_models(preset, checkpoints=args.checkpoints, device=device, variant=args.variant,
                         dtype_policy=args.dtype_policy, memory=settings.memory)
    load_s = time.perf_counter() - started
    pipeline = StableAvatarPipeline(models, settings)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"  {msg}", file=sys.stderr))
    params = GenerationParams(
        prompt=fields.prompt, aspect_ratio=fields.aspect_ratio, guidance_scale=fields.guidance_scale,
        audio_guidance_scale=fields.audio_guidance_scale, num_inference_steps=fields.num_inference_steps,
        seed=fields.seed, acceleration=fields.acceleration,
    )
    prepared = pipeline.prepare(image, audio, params, progress=log)
    rows = 3 if settings.split_guidance_rows else 1
    total = prepared.plan.num_windows * params.num_inference_steps * rows
    with tqdm(total=total, unit="unit", disable=args.quiet, file=sys.stderr) as bar:
        executor = InProcessExecutor(pipeline.window_denoiser, prepared.conditioning,
                                     on_window_step=lambda _w: bar.update(1),
                                     step_cache=StepCache.from_settings(settings.step_cache))
        latents = asyncio.run(pipeline.denoise(prepared, executor))
    result = pipeline.finish(prepared, latents, args.output, progress=log)

    timings = {"load": load_s, **result.timings}
    print(f"wrote {result.path} ({result.width}x{result.height}, {result.frames} frames, "
          f"{result.frames / FPS:.2f} s, {result.file_size} bytes, seed {prepared.seed})")
    if preset.is_random:
        print(f"note: preset {preset.name!r} has random weights, so the video is noise")
    print("stage summary: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return 0


def pipeline_settings(args: argparse.Namespace):
    """The ``pipeline:`` block of ``--pipeline-config`` (as in the service's app args), then the flags."""
    import yaml

    from pipeline.generator import PipelineSettings

    block = {}
    if args.pipeline_config is not None:
        try:
            block = yaml.safe_load(args.pipeline_config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"--pipeline-config {args.pipeline_config}: {exc}") from None
        if not isinstance(block, dict):
            raise ValueError(f"--pipeline-config {args.pipeline_config}: expected a mapping of pipeline settings")
    flags = {"overlap": args.overlap, "window_policy": args.window_policy,
             "split_guidance_rows": args.split_guidance_rows, "compile": args.compile}
    memory = {"mode": args.memory_mode, "text_encoder_device": args.text_encoder_device}
    memory = {k: v for k, v in memory.items() if v is not None}
    if memory:
        given = block.get("memory") or {}
        if not isinstance(given, dict):
            raise ValueError(f"--pipeline-config {args.pipeline_config}: 'memory' must be a mapping")
        block = block | {"memory": given | memory}
    return PipelineSettings.model_validate(block | {k: v for k, v in flags.items() if v is not None})


def choose_preset(args: argparse.Namespace) -> str:
    """``--preset``, else the real preset when ``--checkpoints`` is given (said on stderr), else ``tiny``. A
    random-weights preset named together with ``--checkpoints`` is refused by ``load_models``: it would silently
    ignore the files and make noise after a full run."""
    if args.preset is not None:
        return args.preset
    if args.checkpoints is not None:
        print(f"note: --checkpoints given: using preset {REAL_PRESET} (the official weights)", file=sys.stderr)
        return REAL_PRESET
    return DEFAULT_PRESET


def run_download(args: argparse.Namespace) -> int:
    from pipeline.weights import download_weights

    download_weights(args.dir, variant=args.variant)
    which = "both transformer variants" if args.variant == "all" else f"transformer variant {args.variant}"
    print(f"downloaded the official checkpoint layout ({which}) into {args.dir}")
    return 0


HANDLERS = {"generate": run_generate, "download-weights": run_download}
