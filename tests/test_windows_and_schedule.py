"""Window plans, overlap fusion, sigma schedule and CFG/Euler math against the upstream golden vectors."""

from __future__ import annotations

import pytest
import torch

from pipeline.schedule import euler_step, guided_velocity, sigma_schedule
from pipeline.windows import (
    SAMPLES_PER_FRAME,
    WINDOW_LATENT_FRAMES,
    Window,
    fuse_step,
    plan_windows,
)


def _upstream_cases(golden):
    return [c for c in golden("windows").json("windows")["cases"] if c["terminates"] and c.get("windows")]


def test_upstream_window_plan_matches_golden(golden):
    cases = _upstream_cases(golden)
    assert {c["T"] for c in cases} == {22, 25, 32, 63, 375}
    for case in cases:
        plan = plan_windows(case["audio_num_samples"], case["overlap_window_length"], "upstream", 84)
        assert plan.latent_frames == case["T"]
        got = [(w.start, w.end, w.previous_end, w.audio_start, w.audio_end) for w in plan.windows]
        want = [(w["index_start"], w["index_end"], w["index_previous_end"], w["audio_sample_start"],
                 w["audio_sample_end"]) for w in case["windows"]]
        assert got == want, (case["T"], case["overlap_window_length"])


@pytest.mark.parametrize("latent_frames", [20, 21])
def test_upstream_policy_refuses_what_upstream_cannot_do(golden, latent_frames):
    samples = (4 * (latent_frames - 1) + 1) * SAMPLES_PER_FRAME
    with pytest.raises(ValueError, match="upstream window policy"):
        plan_windows(samples, 5, "upstream")


@pytest.mark.parametrize("seconds", [0.04, 1.0, 3.24, 3.3, 3.36, 3.4, 5.0, 12.0, 60.0])
@pytest.mark.parametrize("overlap", [5, 10])
def test_full_policy_covers_audio_with_full_windows(seconds, overlap):
    samples = round(seconds * 16000)
    plan = plan_windows(samples, overlap, "full")
    stride = WINDOW_LATENT_FRAMES - overlap
    assert all(w.length == WINDOW_LATENT_FRAMES for w in plan.windows)
    assert [w.start for w in plan.windows] == list(range(0, plan.latent_frames - 20, stride))
    assert plan.windows[-1].end == plan.latent_frames
    # Decoded frames cover the audio; output is trimmed to within half a frame of it.
    assert 4 * (plan.decoded_latent_frames - 1) + 1 >= plan.output_frames
    assert plan.decoded_latent_frames <= plan.latent_frames
    assert abs(plan.output_frames * SAMPLES_PER_FRAME - samples) <= SAMPLES_PER_FRAME / 2 or plan.output_frames == 1
    # Every window hears a full, time-aligned 81-frame slice (silence past the end of the clip).
    assert all(w.audio_end - w.audio_start == 81 * SAMPLES_PER_FRAME for w in plan.windows)
    assert all(w.audio_start == w.start * 4 * SAMPLES_PER_FRAME for w in plan.windows)
    assert plan.padded_audio_samples >= max(samples, plan.windows[-1].audio_end)
    # Same number of windows as upstream would use for audio it can handle.
    if plan.decoded_latent_frames > WINDOW_LATENT_FRAMES:
        upstream_count = 1 + -(-(plan.decoded_latent_frames - WINDOW_LATENT_FRAMES) // stride)
        assert plan.num_windows == upstream_count


@pytest.mark.parametrize("overlap", [1, 21, 0])
def test_bad_overlap_is_refused(overlap):
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(16000 * 5, overlap)


@pytest.mark.parametrize("scheme", ["uniform", "log"])
@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_fusion_matches_golden(golden, scheme, dtype_name):
    data = golden("windows").tensors("fusion_T32_ov5")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    prefix = f"{scheme}_{dtype_name}/"
    windows = [Window(0, 0, 21, 21, 0, 0), Window(1, 16, 32, 21, 0, 0)]
    state = data[prefix + "latents_init"].to(dtype)
    for step in range(2):
        raw = [data[f"{prefix}raw_step{step}_win{w.start}"].to(dtype) for w in windows]
        state = fuse_step(state, raw, windows, step, overlap=5, scheme=scheme)
        assert torch.equal(state.float(), data[f"{prefix}latents_after_step{step}"])


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_sigma_schedule_matches_golden(golden, steps):
    data = golden("schedule").tensors("schedule")
    schedule = sigma_schedule(steps)
    assert torch.equal(schedule.sigmas, data[f"sigmas_{steps}"])
    assert torch.equal(schedule.timesteps, data[f"timesteps_{steps}"])


def test_cfg_and_euler_step_match_golden(golden):
    inputs, outputs = golden("transformer").tensors("inputs"), golden("transformer").tensors("outputs")
    schedule = sigma_schedule(50)
    assert schedule.timesteps[10].item() == inputs["timestep"][0].item()
    velocity = guided_velocity(outputs["noise_pred"], audio_scale=5.0, text_scale=3.0)
    torch.testing.assert_close(velocity, outputs["guided_velocity"], atol=1e-5, rtol=0)
    stepped = euler_step(inputs["latents"], outputs["guided_velocity"], schedule, 10)
    assert torch.equal(stepped, outputs["euler_step_output"])
    # bf16, as the real pipeline runs it: bit-exact from the golden noise_pred.
    velocity_bf16 = guided_velocity(outputs["noise_pred"].bfloat16(), 5.0, 3.0)
    assert torch.equal(velocity_bf16.float(), outputs["guided_velocity_bf16"])
    stepped_bf16 = euler_step(inputs["latents"].bfloat16(), velocity_bf16, schedule, 10)
    assert torch.equal(stepped_bf16.float(), outputs["euler_step_output_bf16"])
