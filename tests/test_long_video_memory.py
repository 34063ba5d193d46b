"""What keeps a long video's memory at the latents (each measured by bench/bench_long_video.py), checked here:

* a step's unit outputs are folded into the new state as they arrive, bit-identical to ``fuse_step`` in any
  arrival order, split rows or not, holding only the outputs that came ahead of their turn;
* ``finish`` converts one decode chunk at a time to fp32, and its output does not depend on the latents' dtype;
* latent checkpoints move through files, never a latent-sized bytes buffer; the final latents travel out of band;
* with the replicas' heap policy, freed tensor buffers go back to the system.

(That a unit pickles only its own frames is ``tests/test_ray_executor.py``'s.)
"""

from __future__ import annotations

import asyncio
import pickle
import random
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from deployments.orchestrator.checkpoints import load_checkpoint, save_checkpoint
from deployments.storage import LocalStorage, LocalStorageConfig, StorageNotFoundError
from pipeline.denoise import ALL_ROWS, SPLIT_ROWS, GuidanceScales, WindowStep, denoise
from pipeline.generator import GenerationParams, StableAvatarPipeline
from pipeline.loading import load_models
from pipeline.presets import get_preset
from pipeline.raw_tensor import RawTensor
from pipeline.schedule import guided_step, sigma_schedule
from pipeline.windows import StreamingFusion, fuse_step, plan_windows
from testing.media import EXAMPLE_IMAGE, synthetic_speech

H, W = 4, 6
RATE = 16000


def _plans():
    return [plan_windows(RATE * 30, 10), plan_windows(RATE * 30, 10, "upstream"), plan_windows(RATE * 12, 15),
            plan_windows(RATE * 9, 2), plan_windows(RATE * 2, 10)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plan_index", range(5))
def test_streaming_fusion_in_any_order_equals_fuse_step_and_leaves_the_previous_state_alone(dtype, plan_index):
    plan = _plans()[plan_index]
    rng = random.Random(plan_index)
    generator = torch.Generator().manual_seed(plan_index)
    previous = torch.randn(1, 16, plan.latent_frames, H, W, generator=generator).to(dtype)
    kept = previous.clone()
    for step in (0, 3):
        outputs = [torch.randn(1, 16, w.length, H, W, generator=generator).to(dtype) for w in plan.windows]
        expected = fuse_step(previous, outputs, plan.windows, step, plan.overlap, "uniform")
        for _ in range(3):
            order = list(range(plan.num_windows))
            rng.shuffle(order)
            fusion = StreamingFusion(previous, plan.windows, step, plan.overlap, "uniform")
            for position in order:
                fusion.add(position, outputs[position])
            assert torch.equal(fusion.result(), expected)
            assert fusion.result() is not previous and torch.equal(previous, kept)


def test_in_order_arrival_holds_at_most_one_output_and_reverse_order_holds_them_all():
    plan = plan_windows(RATE * 60, 10)
    previous = torch.zeros(1, 16, plan.latent_frames, 1, 1)
    outputs = [torch.ones(1, 16, w.length, 1, 1) for w in plan.windows]
    forward = StreamingFusion(previous, plan.windows, 1, plan.overlap)
    for position, output in enumerate(outputs):
        forward.add(position, output)
    backward = StreamingFusion(previous, plan.windows, 1, plan.overlap)
    for position in reversed(range(plan.num_windows)):
        backward.add(position, outputs[position])
    assert plan.num_windows > 30 and forward.most_held == 1 and backward.most_held == plan.num_windows
    assert torch.equal(forward.result(), backward.result())


def test_a_missing_or_repeated_window_output_is_an_error():
    plan = plan_windows(RATE * 10, 10)
    fusion = StreamingFusion(torch.zeros(1, 16, plan.latent_frames, 1, 1), plan.windows, 0, plan.overlap)
    fusion.add(0, torch.zeros(1, 16, 21, 1, 1))
    with pytest.raises(ValueError, match="twice"):
        fusion.add(0, torch.zeros(1, 16, 21, 1, 1))
    with pytest.raises(RuntimeError, match=r"missing the outputs of windows \[1, 2"):
        fusion.result()


def _unit_output(work: WindowStep) -> torch.Tensor:
    """A stand-in unit: deterministic in its inputs, a different value per window, step and row."""
    latents = work.latents.float()
    rows = [latents * (0.9 - 0.05 * r) + 0.01 * work.window - 0.002 * work.step + 0.03 * r for r in work.rows]
    out = torch.cat(rows).to(work.latents.dtype)
    return out if work.rows != ALL_ROWS else out[:1] * 0.5 + out[1:2] * 0.25 + out[2:] * 0.25


class ShuffledStream:
    """An executor with ``as_completed``: every unit's output, in a seeded random order."""

    def __init__(self, seed: int):
        self.rng, self.held = random.Random(seed), 0

    async def run(self, steps: Sequence[WindowStep]) -> list[torch.Tensor]:
        raise AssertionError("denoise streams from as_completed")

    async def as_completed(self, steps: Sequence[WindowStep]):
        order = list(range(len(steps)))
        self.rng.shuffle(order)
        for position in order:
            yield position, _unit_output(steps[position])
            await asyncio.sleep(0)


def _reference_denoise(plan, latents, num_steps, split: GuidanceScales | None):
    """The loop as it was before streaming fusion: gather every output, combine split rows, ``fuse_step``."""
    schedule = sigma_schedule(num_steps)
    unit_rows = SPLIT_ROWS if split is not None else (ALL_ROWS,)
    for step in range(num_steps):
        work = [WindowStep(w.index, step, latents[:, :, w.start:w.end], rows) for w in plan.windows
                for rows in unit_rows]
        outputs = [_unit_output(unit) for unit in work]
        if split is not None:
            outputs = [guided_step(torch.cat(outputs[3 * k:3 * k + 3]), latents[:, :, w.start:w.end], schedule,
                                   step, split.audio_scale, split.text_scale) for k, w in enumerate(plan.windows)]
        latents = fuse_step(latents, outputs, plan.windows, step, plan.overlap)
    return latents


@pytest.mark.parametrize("split", [None, GuidanceScales(text_scale=4.5, audio_scale=3.0)], ids=["batch3", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denoise_streaming_in_random_orders_is_bit_identical_to_gathering_and_fuse_step(split, dtype):
    plan = plan_windows(RATE * 20, 10)
    initial = torch.randn(1, 16, plan.latent_frames, H, W, generator=torch.Generator().manual_seed(5)).to(dtype)
    kept = initial.clone()
    expected = _reference_denoise(plan, initial, 4, split)
    for seed in range(3):
        result = asyncio.run(denoise(plan, initial, 4, ShuffledStream(seed), split_guidance=split))
        assert torch.equal(result, expected), seed
    assert torch.equal(initial, kept)  # never fused in place


@pytest.fixture(scope="module")
def tiny():
    return StableAvatarPipeline(load_models(get_preset("tiny")))


@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory):
    audio = synthetic_speech(tmp_path_factory.mktemp("audio") / "speech.wav", 4.0)
    return tiny.prepare(EXAMPLE_IMAGE, audio, GenerationParams(prompt="talking", num_inference_steps=2, seed=3))


class ConversionTracker(torch.Tensor):
    """Records the element count of every bf16 -> fp32 conversion made from it (views stay tracked)."""

    largest = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        source = args[0] if args else None
        with torch._C.DisableTorchFunctionSubclass():  # reading .dtype would dispatch here again
            if (isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor)
                    and source.dtype == torch.bfloat16 and out.dtype == torch.float32):
                cls.largest = max(cls.largest, out.numel())
        return out


def test_finish_converts_one_chunk_at_a_time_and_does_not_depend_on_the_latent_dtype(tiny, prepared, tmp_path):
    latents = tiny.initial_latents(prepared).to(torch.bfloat16)
    _, channels, _, h, w = latents.shape
    chunk = tiny.settings.decode_chunk_latents
    assert prepared.plan.decoded_latent_frames > 2 * chunk  # several chunks
    ConversionTracker.largest = 0
    tracked = tiny.finish(prepared, latents.as_subclass(ConversionTracker), tmp_path / "bf16.mp4")
    assert 0 < ConversionTracker.largest <= chunk * channels * h * w
    reference = tiny.finish(prepared, latents.float(), tmp_path / "fp32.mp4")
    assert tracked.frames == reference.frames == prepared.plan.output_frames
    assert (tmp_path / "bf16.mp4").read_bytes() == (tmp_path / "fp32.mp4").read_bytes()


class FilesOnlyStorage(LocalStorage):
    """Local storage that refuses whole-object bytes: a checkpoint must go through files."""

    def put_bytes(self, key, data, content_type):
        raise AssertionError(f"put_bytes({key!r}) holds the checkpoint in memory")

    def get_bytes(self, key, max_bytes=None):
        raise AssertionError(f"get_bytes({key!r}) holds the checkpoint in memory")


def test_latent_checkpoints_go_through_files_and_round_trip(tmp_path):
    storage = FilesOnlyStorage(LocalStorageConfig(root=tmp_path / "storage", url_secret="x"))
    latents = torch.randn(1, 16, 43, H, W).to(torch.bfloat16)
    size = save_checkpoint(storage, "checkpoints/job/e1/latents.pt", latents, step=4, seed=9,
                           shape=[1, 16, 43, H, W], num_steps=50)
    assert size > latents.numel() * 2
    state = load_checkpoint(storage, "checkpoints/job/e1/latents.pt")
    assert (state["step"], state["seed"], state["shape"], state["num_steps"]) == (4, 9, [1, 16, 43, H, W], 50)
    assert state["latents"].dtype == torch.bfloat16 and torch.equal(state["latents"], latents)
    with pytest.raises(StorageNotFoundError):
        load_checkpoint(storage, "checkpoints/other/e1/latents.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_raw_tensor_travels_out_of_band_and_is_read_in_place(dtype):
    tensor = torch.randn(1, 16, 9, H, W).to(dtype)
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(RawTensor(tensor), protocol=5, buffer_callback=buffers.append)
    assert len(data) < 1024 and [memoryview(b).nbytes for b in buffers] == [tensor.numel() * tensor.element_size()]
    received = pickle.loads(data, buffers=buffers).tensor()  # as Ray does from the object store
    assert received.dtype == dtype and torch.equal(received, tensor)
    address = np.frombuffer(buffers[0], dtype=np.uint8).__array_interface__["data"][0]
    assert received.untyped_storage().data_ptr() == address  # read in place, not copied


CHURN = """
import asyncio, re, resource, sys, torch
from concurrent.futures import ThreadPoolExecutor
from deployments.runtime.replica import limit_heap_retention, releases_freed_heap

def private_mib():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

if sys.argv[1] == "policy":
    assert limit_heap_retention()
torch.set_num_threads(1)
before, faults_before = private_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def churn(_):  # window-sized buffers, their pickled bytes and copies, freed in other threads' order
    held = []
    for _ in range(20):
        buffer = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)
        pickled = bytes(buffer.numpy())
        held.append(buffer.clone())
        del pickled
        if len(held) > 3:
            held.pop(0)

def run():
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(churn, range(12)))

held = [0]  # private MiB at the end of the call, before the release

@releases_freed_heap
async def call():  # a replica method whose work runs in threads
    await asyncio.to_thread(run)
    held[0] = private_mib() - before

if sys.argv[1] == "released":
    asyncio.run(call())
else:
    run()
    held[0] = private_mib() - before
print(held[0], private_mib() - before, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
"""


def churned(mode: str) -> tuple[int, int, int]:
    """(MiB of private memory kept, page faults taken, MiB held when the churn's last buffer was freed) after the
    churn under the heap ``mode`` (for ``released``: held before the release)."""
    import subprocess
    import sys

    from testing.media import REPO_ROOT

    out = subprocess.run([sys.executable, "-c", CHURN, mode], check=True, capture_output=True, text=True,
                         cwd=REPO_ROOT)
    held, kept, faults = out.stdout.split()[-3:]
    return int(kept), int(faults), int(held)


def test_with_the_heap_policy_freed_tensor_buffers_go_back_to_the_system():
    assert churned("default")[0] > 100  # glibc's default keeps what the threads freed (MiB)
    assert churned("policy")[0] < 32


def test_a_call_that_releases_the_freed_heap_gives_back_what_it_freed_and_reuses_its_pages():
    """The Pre- and Postprocessor's way: buffers reused from the heap during the call (a page fault only where a
    page is first touched, as glibc's default), the free pages returned when it ends (all but the free top of
    each thread's heap, which ``malloc_trim`` leaves); the per-buffer policy faults in every buffer afresh."""
    kept, faults, held = churned("released")
    default_kept, default_faults, _ = churned("default")
    # what the call held at its end is what glibc's default keeps (> 100 MiB); the release gives back at least two
    # thirds of it, paired in one process, since how much each thread's heap top holds varies from run to run
    assert held > 100 and default_kept > 100
    assert kept * 3 < held
    assert faults < 1.5 * default_faults
    assert faults * 2 < churned("policy")[1]
