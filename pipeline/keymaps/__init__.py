"""Explicit key maps from the official checkpoint layouts to our diffusers/transformers modules.

Every component has its own module with a ``convert_*`` function (original names in, model names out). Loading is
always strict: a checkpoint that lacks a key or carries an unexpected one is refused with the keys named, because
a silently half-loaded 1.3B model produces plausible-looking garbage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

MAX_KEYS_SHOWN = 12


class CheckpointKeyError(ValueError):
    """A checkpoint's keys do not match the model: lists the missing and unexpected names."""

    def __init__(self, component: str, missing: Iterable[str], unexpected: Iterable[str]):
        self.component = component
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        parts = []
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {_preview(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {_preview(self.unexpected)}")
        super().__init__(f"{component} checkpoint does not match the model: " + "; ".join(parts))


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    return shown + (f", ... (+{len(keys) - MAX_KEYS_SHOWN} more)" if len(keys) > MAX_KEYS_SHOWN else "")


def check_keys(component: str, expected: Iterable[str], given: Iterable[str]) -> None:
    """Raise ``CheckpointKeyError`` unless ``given`` names exactly the ``expected`` keys."""
    expected_set, given_set = set(expected), set(given)
    missing, unexpected = expected_set - given_set, given_set - expected_set
    if missing or unexpected:
        raise CheckpointKeyError(component, missing, unexpected)


def check_original_keys(component: str, state_dict: Mapping[str, object], required: Iterable[str]) -> None:
    """Check the *original* key names before conversion, so errors name the keys as the user's file spells them."""
    check_keys(component, required, state_dict.keys())
