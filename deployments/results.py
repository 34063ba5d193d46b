"""Stored results keep the video as a storage key; URLs (signed, expiring) are made each time one is read."""

from __future__ import annotations

from typing import Any

from deployments.storage import Storage


def stored_output(key: str, file_size: int, seed: int, file_name: str = "output.mp4") -> dict[str, Any]:
    return {"video": {"key": key, "content_type": "video/mp4", "file_name": file_name, "file_size": file_size},
            "seed": seed}


def public_result(result: dict[str, Any] | None, storage: Storage) -> dict[str, Any] | None:
    """The fal output (``{"video": File, "seed"}``) with a fresh URL for the stored video."""
    if result is None:
        return None
    video = dict(result["video"])
    key = video.pop("key")
    video["url"] = storage.url(key, filename=video.get("file_name"))
    return {"video": video, "seed": result["seed"]}
