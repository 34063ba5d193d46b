"""The model fingerprint of presets whose stand-in factories are partials (the benchmarks' simulated presets)."""

from __future__ import annotations

import dataclasses
import functools
import json

from deployments.config import AppArgs
from deployments.runtime.fingerprint import model_fingerprint, output_settings
from pipeline.presets import PRESETS, register_preset


class StandIn:
    def __init__(self, seconds: float):
        self.seconds = seconds


def preset_with_factory(name: str, seconds: float) -> AppArgs:
    register_preset(dataclasses.replace(PRESETS["tiny"], name=name,
                                        transformer_factory=functools.partial(StandIn, seconds)))
    return AppArgs.model_validate({"preset": name, "device": "cpu"})


def test_a_partial_factory_is_fingerprinted_by_its_function_and_arguments():
    slow, fast = preset_with_factory("fp-slow", 2.0), preset_with_factory("fp-fast", 0.5)
    assert model_fingerprint(slow) != model_fingerprint(fast)
    described = json.dumps(output_settings(slow))
    assert "test_fingerprint.StandIn" in described and "2.0" in described
    assert "0x" not in described  # by name, never by address: every process computes the same fingerprint
