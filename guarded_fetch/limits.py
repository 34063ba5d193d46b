"""What one fetch may cost: the request fields it serves and their size and time limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

InputField = Literal["image_url", "audio_url"]
MIB = 1024 * 1024


class FetchLimits(BaseModel):
    """Size and time limits of one input fetch (the ``inputs.fetch`` block of the app arguments)."""

    model_config = ConfigDict(extra="forbid")

    max_image_bytes: int = Field(20 * MIB, ge=1, description="largest image_url body (also for data: URIs)")
    max_audio_bytes: int = Field(200 * MIB, ge=1, description="largest audio_url body (also for data: URIs)")
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="DNS resolution and TCP/TLS connect")
    read_timeout_s: float = Field(10.0, gt=0, le=600, description="longest silence while reading")
    total_timeout_s: float = Field(60.0, gt=0, le=3600, description="whole fetch, redirects included")
    max_redirects: int = Field(3, ge=0, le=10)

    def max_bytes(self, field: str) -> int:
        return self.max_audio_bytes if field == "audio_url" else self.max_image_bytes


def human_size(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n} bytes"
