"""The long-video benchmark's core, at a 2 s clip: a real-size (480x832) job through a fresh local service.

It keeps ``bench/bench_long_video.py`` from rotting (log lines it keys on, replica titles, the preset, the HTTP
flow) and checks the invariants its README numbers rest on: a window-step carries only its own frames, the
latents reach the Postprocessor once, the mp4 has the right frames and duration.
"""

from __future__ import annotations

import pytest

from bench.bench_long_video import DEPLOYMENTS, run_length, text_report

pytestmark = pytest.mark.serve  # the benchmark's own fresh cluster (object store size, replica TMPDIR)

SECONDS = 2.0


@pytest.fixture(scope="module")
def row(tmp_path_factory):
    return run_length(SECONDS, steps=1, workdir=tmp_path_factory.mktemp("long"), denoisers=1, object_store_mb=600)


def test_the_job_completes_with_real_size_frames_and_the_audio_duration(row):
    assert (row["width"], row["height"], row["frames"], row["windows"]) == (480, 832, 50, 1)
    assert row["latent_shape"] == [1, 16, 21, 104, 60]
    probe = row["ffprobe"]
    assert (probe["codec"], probe["width"], probe["height"], probe["frames"]) == ("h264", 480, 832, 50)
    assert probe["video_duration_s"] == pytest.approx(2.0, abs=0.02)
    assert probe["format_duration_s"] == pytest.approx(SECONDS, abs=0.05)
    assert row["frames_ok"] and row["duration_ok"] and row["output_mb"] > 0


def test_every_deployment_is_measured(row):
    assert set(row["memory"]) >= set(DEPLOYMENTS)
    for name in DEPLOYMENTS:
        memory = row["memory"][name]
        assert memory["replicas"] == 1, name
        assert memory["peak_rss_mb"] >= memory["rss_before_mb"] > 100, (name, memory)
        assert memory["peak_private_mb"] > 0, (name, memory)
    stages = row["stages"]
    assert all(stages[f"{s}_s"] >= 0 for s in ("queued", "preprocessing", "denoising", "postprocessing"))
    assert stages["total_s"] >= stages["postprocessing_s"] > 0
    assert row["decode_encode_fps"] > 0 and row["disk"]["tmp_peak_mb"] > 0


def test_object_store_traffic_is_one_window_per_window_step_and_the_latents_once(row):
    window = row["window_latents_mb"]
    assert window == pytest.approx(16 * 21 * 104 * 60 * 4 / 2**20, abs=0.01)
    assert row["window_step_sent_mb"] == pytest.approx(window, rel=0.01)
    assert row["window_step_received_mb"] == pytest.approx(window, rel=0.01)
    # The step's window: the conditioning put, the unit out, its output back, the latents put for the
    # Postprocessor. The edges are object-store samples taken every 50 ms by a thread that lags on a loaded box, so
    # the first sample may still precede the Preprocessor's answer (the conditioning once more).
    (step,) = row["object_store"]["per_step_mb"]
    assert window <= step <= 3 * window + 2 * row["conditioning_mb"]
    assert row["latents_mb"] <= row["object_store"]["postprocess_in_use_mb"] <= row["latents_mb"] * 1.5
    assert row["object_store"]["spilled_mb"] == 0


def test_the_text_report_renders_every_row(row):
    report = text_report([row], "test")
    rows = [line for line in report.splitlines() if line.startswith(f"{SECONDS:>7g} | ")]
    assert "480x832" in report and len(rows) == 3
