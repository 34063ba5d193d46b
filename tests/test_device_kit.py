"""The device kit (``bench/device/``, docs/gpu.md) at tiny size on the CPU with this environment: the single command
of each device call writes its JSON and table, never imports the service's packages, and a budget too short for
a phase skips it with a note instead of running over. The same scripts on the GPU image's versions (Python 3.12,
torch 2.11, transformers 5.17) are ``make device-check`` (a ~5 GB environment: not for CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bench import bench_gpu
from testing.media import REPO_ROOT

pytestmark = pytest.mark.long  # the device scripts end to end at tiny size, a minute or more in all

# What the service needs and the GPU image lacks; the benchmark must not import any of it.
SERVICE_ONLY = ("ray", "boto3", "botocore", "psycopg", "psycopg_pool", "fastapi", "starlette", "uvicorn", "fal_client")


def kit_env(tmp_path, budget: int = 600) -> dict[str, str]:
    """A device script's environment: no carried wheels, the service packages unimportable, ``$OUT`` in tmp."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in SERVICE_ONLY))
    wheels = tmp_path / "no-wheels"
    wheels.mkdir(exist_ok=True)
    return {**os.environ, "PYTHON": sys.executable, "WHEELS": str(wheels), "OUT": str(tmp_path / "out"),
            "BUDGET_S": str(budget), "PYTHONPATH": str(blocker)}


def run_script(script: str, tmp_path, *args: str, budget: int = 600) -> tuple[subprocess.CompletedProcess, dict, str]:
    """``bash bench/device/<script> --tiny ARGS`` with no carried wheels and the service packages unimportable."""
    env = kit_env(tmp_path, budget)
    proc = subprocess.run(["bash", str(REPO_ROOT / "bench" / "device" / script), "--tiny", *args],
                          capture_output=True, text=True, env=env, timeout=budget + 60)
    out = tmp_path / "out"
    result = json.loads((out / "gpu.json").read_text())
    return proc, result, (out / "gpu.txt").read_text()


def test_the_first_call_measures_every_phase_and_writes_the_table(tmp_path):
    proc, result, table = run_script("run.sh", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no wheels in" in proc.stdout and table in proc.stdout  # the table is the call's output
    assert result["errors"] == {} and result["skipped"] == {}
    assert {"card", "load", "preprocess", "forward", "sdpa", "vae_decode", "e2e", "acceleration",
            "split_rows"} <= set(result)
    e2e = result["e2e"]
    assert set(e2e["peak_memory_per_stage"]) == {"prepare", "denoise", "decode_encode"}
    extrapolated = e2e["extrapolated"]
    assert extrapolated["steps"] == 50
    assert extrapolated["total_s"] == pytest.approx(
        e2e["prepare_s"] + e2e["denoise_s"] / e2e["steps"] * 50 + e2e["decode_encode_s"], abs=0.02)
    assert extrapolated["gpu_seconds_per_output_second"] == pytest.approx(
        extrapolated["total_s"] / e2e["audio_s"], abs=0.01)
    for line in ("DiT forward batch1", "DiT forward batch3", "attention: diffusers backend", "VAE decode:",
                 "GPU-seconds per output second", "preprocess at 48x80"):
        assert line in table, line


def test_the_second_call_runs_every_memory_mode(tmp_path):
    proc, result, table = run_script("run_modes.sh", tmp_path, "--phases", "memory_modes")  # compile: test_bench_gpu
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    modes = result["memory_modes"]["modes"]
    assert list(modes) == list(bench_gpu.MEMORY_MODES) and result["memory_modes"]["reference_mode"] == "full"
    for mode, clip in modes.items():
        diff = clip["latents_max_abs_diff_vs_reference"]
        assert (diff > 0) if "fp8_weights" in mode else (diff == 0), mode
        assert clip["frames"] == 125
    assert "memory modes (2 steps; latents vs full)" in table and "block_offload+fp8_weights" in table


def test_a_budget_too_short_skips_with_a_note(tmp_path):
    """No phase fits a spent budget: each is skipped with its estimate, and the files still say so. (The scripts'
    hard stop, ``timeout`` at the budget, is not exercised: when it strikes depends on this machine's load.)"""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "bench_gpu.py"), "--preset", "tiny", "--device", "cpu", "--quick",
         "--budget-s", "0", "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, table = json.loads((tmp_path / "gpu.json").read_text()), (tmp_path / "gpu.txt").read_text()
    assert result["errors"] == {} and "load" not in result  # card is always needed: nothing after it runs
    assert result["skipped"]["card"].startswith("needs ~5 s by its estimate, 0 s of the budget left")
    assert "skipped:" in table and "card: needs ~5 s" in table


def test_e2e_takes_the_steps_that_fit_the_time_left():
    args = bench_gpu.parse(["--preset", "tiny", "--device", "cpu", "--steps", "50"])
    bench = bench_gpu.Bench(args)
    bench.out.update(forward={"batch3": {"latency_s_min": 2.0}}, preprocess={"windows": 2, "prepare_cold_s": 10.0},
                     vae_decode={"seconds": 20.0})
    assert bench.e2e_steps() == 50  # no budget
    args.budget_s = time.monotonic() - bench_gpu.PROCESS_STARTED + 202  # 202 s left, less what this test takes
    assert bench.e2e_steps() == 36  # int((0.9 * 202 - prepare 10 - decode 20 - encode 6) / (2 windows * 2 s))
    args.budget_s -= 170  # 32 s left: still the minimum of 2 steps, and the phase would be skipped
    assert bench.e2e_steps() == 2 and bench.estimate("e2e") > bench.time_left()


def test_the_wheel_list_pins_one_version_of_each():
    lines = [line.strip() for line in (REPO_ROOT / "bench" / "device" / "wheels.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    names = [line.split("==")[0].lower().replace("_", "-") for line in lines]
    assert all("==" in line for line in lines) and len(set(names)) == len(names)
    assert {"diffusers", "pydantic", "pydantic-core", "ffmpeg-python", "imageio-ffmpeg"} <= set(names)


def test_the_multi_gpu_phase_refuses_too_few_gpus_and_dry_runs_on_the_cpu(tmp_path):
    """``sp_multi_gpu.sh`` stops at once, saying why, where the node has fewer GPUs than its largest degree (this
    machine: none; a lent device: one); ``--tiny`` runs the same timing code over gloo and rebuilds the latency
    estimate from the unit times it measured."""
    script = str(REPO_ROOT / "bench" / "device" / "sp_multi_gpu.sh")
    env = kit_env(tmp_path)
    refused = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "needs 8 GPUs on this node; it has 0" in refused.stderr, refused.stderr
    assert "cannot run this phase" in refused.stderr and not (tmp_path / "out" / "sp_gpu.json").exists()
    dry = subprocess.run(["bash", script, "--tiny"], capture_output=True, text=True, env=env, timeout=600)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    timing = json.loads((tmp_path / "out" / "sp_gpu.json").read_text())["timing"]
    assert [r["degree"] for r in timing] == [1, 2]
    estimate = json.loads((tmp_path / "out" / "sp_estimate.json").read_text())
    assert estimate["meta"]["model"] is False and estimate["meta"]["measured_degrees"] == [1, 2]
    assert estimate["meta"]["forward_s"] == timing[0]["median_s_per_unit"]
    assert {r["unit_source"] for r in estimate["rows"] if r["sp_degree"] in (1, 2)} == {"measured"}
