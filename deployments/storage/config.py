"""The ``storage:`` block of the app arguments: a local directory or an S3-compatible bucket."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer than 7 days


class LocalStorageConfig(BaseModel):
    """A directory on this machine; URLs are signed ``/files/...`` links served by the Gateway."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local"] = "local"
    root: Path = Path("./data")
    # HMAC key for URLs and upload tokens. None: env STABLE_AVATAR_URL_SECRET, else a random key the service
    # creates once in its jobs database (deployments.storage.signing.service_secret), never in the storage itself.
    url_secret: str | None = Field(default=None, repr=False, min_length=1)
    public_base_url: str | None = None  # e.g. http://127.0.0.1:8000; None: relative /files/... URLs
    url_expiry_s: int = Field(default=7 * 24 * 3600, ge=1)


class S3StorageConfig(BaseModel):
    """An S3-compatible bucket. Credentials come from the environment (boto3 chain), never from here."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["s3"]
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = ""
    endpoint_url: str | None = None  # None: AWS; set for MinIO/SeaweedFS/R2/... (path-style addressing)
    region: str = "us-east-1"
    public_base_url: str | None = None  # set: URLs are public_base_url/prefix/key instead of presigned
    url_expiry_s: int = Field(default=7 * 24 * 3600, ge=1, le=MAX_PRESIGN_S)
    multipart_threshold_mb: int = Field(default=16, ge=5)  # S3 parts are at least 5 MiB
    create_bucket: bool = False


StorageConfig = Annotated[LocalStorageConfig | S3StorageConfig, Field(discriminator="kind")]
