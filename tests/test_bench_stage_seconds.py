"""``bench/bench_long_video.py``'s stage timing from polled job status: stages the polls never saw count 0 s and
no stage is ever negative, so the benchmark's stage table adds up to the job's total."""

from __future__ import annotations

import pytest

from bench.bench_long_video import JobTrace, stage_seconds


def trace(*polls: tuple[float, str, str]) -> JobTrace:
    return JobTrace(submitted=100.0, polls=list(polls))


def test_every_stage_seen_gives_the_gaps_between_first_sightings():
    stages = stage_seconds(trace((101, "IN_QUEUE", ""), (102, "IN_PROGRESS", "preprocessing"),
                                 (104, "IN_PROGRESS", "denoising"), (110, "IN_PROGRESS", "postprocessing"),
                                 (113, "COMPLETED", "")))
    assert stages == {"queued_s": 2, "preprocessing_s": 2, "denoising_s": 6, "postprocessing_s": 3,
                      "total_s": 13}
    assert [stages[f"{s}_s"] for s in ("queued", "preprocessing", "denoising", "postprocessing")] == [2, 2, 6, 3]


def test_a_stage_no_poll_saw_counts_zero_and_later_marks_never_go_back():
    # Denoising was shorter than a poll interval: the polls went from preprocessing straight to postprocessing.
    stages = stage_seconds(trace((102, "IN_PROGRESS", "preprocessing"), (106, "IN_PROGRESS", "postprocessing"),
                                 (109, "COMPLETED", "")))
    assert [stages[f"{s}_s"] for s in ("queued", "preprocessing", "denoising", "postprocessing")] == [2, 4, 0, 3]
    assert stages["total_s"] == pytest.approx(9)


def test_a_job_first_seen_completed_puts_all_its_time_in_the_queue_stage():
    stages = stage_seconds(trace((105, "COMPLETED", "")))
    assert [stages[f"{s}_s"] for s in ("queued", "preprocessing", "denoising", "postprocessing")] == [5, 0, 0, 0]
    assert stages["total_s"] == 5
