"""``s3://bucket/key`` inputs from buckets the operator allow-listed (``inputs.s3_input_buckets``)."""

from __future__ import annotations

from typing import Any

from deployments.storage.base import Storage
from deployments.storage.s3 import S3Storage, client_error_code


class S3InputReader:
    """Reads input objects through the service's own S3 client when its storage is S3 (same endpoint and
    credentials), else through a client made from the environment on first use."""

    def __init__(self, storage: Storage):
        self._client: Any = storage.client if isinstance(storage, S3Storage) else None

    def _s3(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client("s3")
        return self._client

    def read(self, bucket: str, key: str, max_bytes: int) -> bytes:
        """At most ``max_bytes + 1`` bytes of the object (so the fetcher can refuse an oversized one without reading
        all of it); ``KeyError`` when it does not exist."""
        try:
            response = self._s3().get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if client_error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise KeyError(key) from None
            raise
        body = response["Body"]
        try:
            return body.read(max_bytes + 1)
        finally:
            body.close()
