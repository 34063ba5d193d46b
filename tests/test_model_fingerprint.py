"""The model fingerprint of presets built with ``functools.partial`` factories (the benchmarks' stand-ins): it is
computed at all (every Preprocessor replica computes it at start) and tells apart presets whose factories differ
only in their bound arguments."""

from __future__ import annotations

import bench.simulated  # noqa: F401  (registers the simulated presets)
from deployments.config import AppArgs
from deployments.runtime.fingerprint import model_fingerprint, output_settings


def args(preset: str) -> AppArgs:
    return AppArgs.model_validate({"preset": preset, "preset_modules": ["bench.simulated"], "device": "cpu"})


def test_a_partial_factory_is_named_by_its_function_and_bound_arguments():
    factory = output_settings(args("simulated-decoder-dit"))["preset"]["transformer_factory"]
    assert factory == {"partial": "bench.simulated.SimulatedTransformer", "args": [0.05], "keywords": {}}


def test_presets_differing_only_in_a_bound_argument_have_different_fingerprints():
    prints = {preset: model_fingerprint(args(preset))
              for preset in ("simulated-decoder", "simulated-decoder-dit", "simulated", "simulated-fast")}
    assert len(set(prints.values())) == 4, prints
    assert all(len(p) == 16 for p in prints.values())
    assert model_fingerprint(args("simulated-decoder")) == prints["simulated-decoder"]  # stable across calls
