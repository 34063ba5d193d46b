"""The Serve parts of ``bench/bench_segments.py`` at a tiny size, so they do not rot: (a) an 8 s video on 1 and 2
Postprocessor replicas (2 segments, each on its own replica), (c) a 3 s video end to end with serial and segmented
post-processing; the numbers they record and the report that renders them."""

from __future__ import annotations

import pytest

from bench.segments_serve import end_to_end_part, replicas_part, report_lines


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, serve_cluster):
    return replicas_part(False, tmp_path_factory.mktemp("post"), plan={8.0: (1, 2)}, min_segment_latents=4,
                         cluster=serve_cluster)


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory, serve_cluster):
    return end_to_end_part(False, tmp_path_factory.mktemp("e2e"), seconds=3.0, steps=1, post_replicas=2,
                           min_segment_latents=4, cluster=serve_cluster)


def test_decode_and_encode_spread_over_the_replicas_with_the_same_video(replicas):
    result, summary = replicas
    one, two = result["rows"]
    assert (one["replicas"], one["segments"], two["replicas"], two["segments"]) == (1, 1, 2, 2)
    assert two["replicas_used"] == 2  # each segment on its own replica
    assert one["frames_written"] == two["frames_written"] == one["frames"] == 200
    assert two["durations"] == one["durations"] and all(r["same_frames_and_durations"] for r in result["rows"])
    assert one["ideal_s"] == pytest.approx(200 * result["frame_s"]) and two["ideal_s"] == one["ideal_s"] / 2
    assert 0 < two["efficiency_vs_ideal"] <= 1 and two["speedup_vs_1"] > 0
    assert summary["post_same_frames_and_durations"] and summary["post_efficiency_vs_ideal_8"] is None


def test_end_to_end_serial_then_segmented(end_to_end):
    result, summary = end_to_end
    serial, segmented = result["rows"]
    assert (serial["segments"], segmented["segments"]) == (1, 2)
    assert serial["durations"] == segmented["durations"] and result["same_durations"]
    assert serial["durations"]["video"] == pytest.approx(3.0, abs=0.04)
    assert summary["end_to_end_speedup_60s"] == result["speedup"] > 0


def test_the_report_renders_both_parts(replicas, end_to_end):
    lines = report_lines({"replicas": replicas[0], "end_to_end": end_to_end[0]})
    assert any(line.startswith("(a) decode + encode") for line in lines)
    assert any(line.startswith("(c) a 3 s video") for line in lines)
    assert sum(line.startswith(("      8 |", "serial ", "segmented ")) for line in lines) == 4
