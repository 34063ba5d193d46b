"""Both storage backends against the same contract: a local directory and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import TypeAdapter, ValidationError

from deployments.storage import (
    LocalStorage,
    LocalStorageConfig,
    S3Storage,
    S3StorageConfig,
    Storage,
    StorageConfig,
    StorageError,
    StorageNotFoundError,
    StorageTooLargeError,
    make_storage,
)
from testing.seaweedfs import SeaweedFS

BAD_KEYS = ["", "/abs", "a/../b", "..", "a//b", "a/", "./a", "a\\b", "a\x00b", "a\nb"]


def s3_config(server: SeaweedFS, **overrides) -> S3StorageConfig:
    """Every test gets its own corner of the shared bucket; 5 MB parts so the multipart path is exercised."""
    return server.storage_config(**({"multipart_threshold_mb": 5} | overrides))


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.database)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return make_storage(LocalStorageConfig(root=tmp_path / "store"))
    server = request.getfixturevalue("s3_env")
    return make_storage(s3_config(server))


def http_get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


# ------------------------------------------------------------------------------------------- both backends


def test_put_get_bytes_exists_delete(storage: Storage) -> None:
    assert storage.put_bytes("jobs/a/record.json", b'{"x": 1}', "application/json") == 8
    assert storage.get_bytes("jobs/a/record.json") == b'{"x": 1}'
    assert storage.exists("jobs/a/record.json")
    assert not storage.exists("jobs/a/other.json")
    assert not storage.exists("jobs/a")  # a "directory" is not a key
    assert storage.put_bytes("jobs/a/record.json", b"v2", "application/json") == 2  # overwrite
    assert storage.get_bytes("jobs/a/record.json") == b"v2"
    storage.delete("jobs/a/record.json")
    assert not storage.exists("jobs/a/record.json")
    storage.delete("jobs/a/record.json")  # deleting a missing key is fine
    with pytest.raises(StorageNotFoundError):
        storage.get_bytes("jobs/a/record.json")


def test_missing_key(storage: Storage) -> None:
    with pytest.raises(StorageNotFoundError) as info:
        storage.get_bytes("nope/missing.bin")
    assert isinstance(info.value, StorageError) and isinstance(info.value, KeyError)
    assert "nope/missing.bin" in str(info.value)


def test_list_keys(storage: Storage) -> None:
    for key in ("jobs/1/in.png", "jobs/1/out.mp4", "jobs/2/in.png", "jobs10/x", "other/y"):
        storage.put_bytes(key, b"-", "application/octet-stream")
    assert storage.list_keys("jobs/1/") == ["jobs/1/in.png", "jobs/1/out.mp4"]
    assert storage.list_keys("jobs/") == ["jobs/1/in.png", "jobs/1/out.mp4", "jobs/2/in.png"]
    assert storage.list_keys("jobs") == ["jobs/1/in.png", "jobs/1/out.mp4", "jobs/2/in.png", "jobs10/x"]
    assert storage.list_keys("jobs/1/in") == ["jobs/1/in.png"]
    assert storage.list_keys("none/") == []
    assert storage.list_keys() == sorted(
        ["jobs/1/in.png", "jobs/1/out.mp4", "jobs/2/in.png", "jobs10/x", "other/y"]
    )


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_rejected(storage: Storage, key: str) -> None:
    for call in (
        lambda: storage.put_bytes(key, b"x", "text/plain"),
        lambda: storage.get_bytes(key),
        lambda: storage.exists(key),
        lambda: storage.delete(key),
        lambda: storage.url(key),
    ):
        with pytest.raises(ValueError):
            call()


def test_max_bytes(storage: Storage) -> None:
    storage.put_bytes("blob.bin", b"x" * 100, "application/octet-stream")
    assert storage.get_bytes("blob.bin", max_bytes=100) == b"x" * 100
    with pytest.raises(StorageTooLargeError):
        storage.get_bytes("blob.bin", max_bytes=99)
    with pytest.raises(StorageNotFoundError):
        storage.get_bytes("missing.bin", max_bytes=10)


def test_put_file_large(storage: Storage, tmp_path: Path) -> None:
    """~11 MB with a 5 MB threshold: a multipart upload on S3."""
    data = os.urandom(11 * 1024 * 1024 + 123)
    src = tmp_path / "big.mp4"
    src.write_bytes(data)
    assert storage.put_file("results/big.mp4", src, "video/mp4") == len(data)
    assert storage.get_bytes("results/big.mp4") == data
    if isinstance(storage, S3Storage):
        head = storage.client.head_object(Bucket=storage.bucket, Key=storage.prefix + "results/big.mp4")
        assert "-" in head["ETag"], "expected a multipart ETag (md5-of-parts '-N')"
        assert head["ContentType"] == "video/mp4"


def test_get_file_copies_the_object_to_a_file_and_names_a_missing_key(storage: Storage, tmp_path: Path) -> None:
    """~11 MB with a 5 MB threshold: a ranged (multipart) download on S3, a file copy locally."""
    data = os.urandom(11 * 1024 * 1024 + 77)
    storage.put_bytes("checkpoints/job/latents.pt", data, "application/octet-stream")
    target = tmp_path / "latents.pt"
    assert storage.get_file("checkpoints/job/latents.pt", target) == len(data)
    assert target.read_bytes() == data
    with pytest.raises(StorageNotFoundError, match="missing.pt"):
        storage.get_file("checkpoints/job/missing.pt", tmp_path / "missing.pt")
    assert not (tmp_path / "missing.pt").exists()


def test_put_file_small(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "small.wav"
    src.write_bytes(b"RIFF....WAVE")
    assert storage.put_file("inputs/a.wav", src, "audio/wav") == 12
    assert storage.get_bytes("inputs/a.wav") == b"RIFF....WAVE"
    assert storage.describe()


# ---------------------------------------------------------------------------------------------------- local


def test_local_files_are_plain_files_and_atomic(tmp_path: Path) -> None:
    store = LocalStorage(LocalStorageConfig(root=tmp_path))
    store.put_bytes("a/b.txt", b"hello", "text/plain")
    assert store.path_for("a/b.txt") == tmp_path.resolve() / "a" / "b.txt"
    assert (tmp_path / "a" / "b.txt").read_bytes() == b"hello"
    assert list((tmp_path / ".tmp").iterdir()) == []  # no temp files left behind
    assert store.list_keys() == ["a/b.txt"]  # the temp dir is not a key
    for reserved in (".url_secret", ".tmp/x"):
        with pytest.raises(ValueError):
            store.put_bytes(reserved, b"x", "text/plain")


def test_local_symlink_cannot_escape_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("no")
    store = LocalStorage(LocalStorageConfig(root=tmp_path / "root"))
    (tmp_path / "root" / "link").symlink_to(outside)
    with pytest.raises(ValueError):
        store.get_bytes("link/secret.txt")


def test_local_url_signature(tmp_path: Path) -> None:
    store = LocalStorage(LocalStorageConfig(root=tmp_path, url_secret="s" * 32))
    url = store.url("jobs/j 1/out.mp4", filename="avatar.mp4")
    parts = urlsplit(url)
    assert parts.path == "/files/jobs/j%201/out.mp4" and not parts.netloc  # relative without public_base_url
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    exp, sig = int(query["exp"]), query["sig"]
    assert query["filename"] == "avatar.mp4"
    assert abs(exp - (time.time() + 7 * 24 * 3600)) < 5
    assert store.verify_signature("jobs/j 1/out.mp4", exp, sig)
    assert not store.verify_signature("jobs/j 1/out.mp4", exp, sig[:-1] + ("A" if sig[-1] != "A" else "B"))
    assert not store.verify_signature("jobs/j 1/other.mp4", exp, sig)  # signature bound to the key
    assert not store.verify_signature("jobs/j 1/out.mp4", exp + 1, sig)  # ... and to the expiry
    assert not store.verify_signature("../etc/passwd", exp, sig)
    assert not store.verify_signature("jobs/j 1/out.mp4", exp, "ünïcode")
    past = int(time.time()) - 1
    assert not store.verify_signature("jobs/j 1/out.mp4", past, store.sign("jobs/j 1/out.mp4", past))

    short = store.url("k.bin", expires_s=60)
    q = {k: v[0] for k, v in parse_qs(urlsplit(short).query).items()}
    assert int(q["exp"]) <= time.time() + 61 and store.verify_signature("k.bin", int(q["exp"]), q["sig"])

    other = LocalStorage(LocalStorageConfig(root=tmp_path, url_secret="t" * 32))
    assert not other.verify_signature("jobs/j 1/out.mp4", exp, sig)


def test_local_public_base_url(tmp_path: Path) -> None:
    store = LocalStorage(LocalStorageConfig(root=tmp_path, public_base_url="http://127.0.0.1:8000/"),
                         url_secret=b"s" * 32)
    assert store.url("a/b.png").startswith("http://127.0.0.1:8000/files/a/b.png?exp=")


def test_local_links_need_the_service_secret_and_leave_nothing_in_the_root(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The secret comes from the service (environment, config or jobs database), never from a file in storage."""
    monkeypatch.setenv("STABLE_AVATAR_URL_SECRET", "ignored-here: the service resolves it")
    plain = LocalStorage(LocalStorageConfig(root=tmp_path))  # Preprocessor/Postprocessor: read and write only
    plain.put_bytes("a/b.txt", b"x", "text/plain")
    with pytest.raises(StorageError, match="without the URL secret"):
        plain.url("a/b.txt")
    exp = int(time.time()) + 100
    given = LocalStorage(LocalStorageConfig(root=tmp_path), url_secret=b"from-the-service")
    assert not plain.verify_signature("a/b.txt", exp, given.sign("a/b.txt", exp))
    assert plain.key_for_url(given.url("a/b.txt")) is None and given.key_for_url(given.url("a/b.txt")) == "a/b.txt"
    same = LocalStorage(LocalStorageConfig(root=tmp_path / "x"), url_secret=b"from-the-service")
    assert same.verify_signature("a/b.txt", exp, given.sign("a/b.txt", exp))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp", "a", "x"]


def test_config_discriminator(tmp_path: Path) -> None:
    adapter = TypeAdapter(StorageConfig)
    local = adapter.validate_python({"kind": "local", "root": str(tmp_path)})
    assert isinstance(local, LocalStorageConfig) and local.root == tmp_path
    s3 = adapter.validate_python({"kind": "s3", "bucket": "media", "endpoint_url": "http://127.0.0.1:9"})
    assert isinstance(s3, S3StorageConfig) and s3.multipart_threshold_mb == 16 and s3.region == "us-east-1"
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "s3", "bucket": "media", "secret_key": "nope"})  # no creds in config
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "gcs"})
    assert LocalStorageConfig().root == Path("data")
    assert "s" * 20 not in repr(LocalStorageConfig(url_secret="s" * 20))


# ------------------------------------------------------------------------------------------------------ s3


def test_s3_presigned_url(s3_env: SeaweedFS) -> None:
    store = S3Storage(s3_config(s3_env))
    store.put_bytes("out/video.mp4", b"\x00\x01mp4-bytes", "video/mp4")
    status, body, headers = http_get(store.url("out/video.mp4", filename="my avatar.mp4"))
    assert status == 200 and body == b"\x00\x01mp4-bytes"
    assert headers.get("Content-Type") == "video/mp4"
    assert "my avatar.mp4" in headers.get("Content-Disposition", "")

    # Without a signature the object is not readable.
    status, _, _ = http_get(f"{s3_env.endpoint_url}/{s3_env.bucket}/{store.prefix}out/video.mp4")
    assert status == 403

    short = store.url("out/video.mp4", expires_s=2)
    assert http_get(short)[0] == 200
    time.sleep(3.5)
    assert http_get(short)[0] == 403
    with pytest.raises(ValueError):
        store.url("out/video.mp4", expires_s=8 * 24 * 3600)  # beyond the SigV4 limit


def test_s3_public_base_url(s3_env: SeaweedFS) -> None:
    store = S3Storage(s3_config(s3_env, prefix="media/v1", public_base_url="https://cdn.example.com/pub/"))
    assert store.url("jobs/1/out.mp4") == "https://cdn.example.com/pub/media/v1/jobs/1/out.mp4"
    assert "cdn.example.com" in store.describe()


def test_s3_wrong_secret_is_clear_and_secret_free(s3_env: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "WRONG-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    config = s3_config(s3_env)
    with pytest.raises(StorageError) as info:
        S3Storage(config)
    message = str(info.value)
    assert "SignatureDoesNotMatch" in message and s3_env.bucket in message and s3_env.endpoint_url in message
    assert wrong not in message and s3_env.secret_key not in message

    unchecked = S3Storage(config, check=False)  # the same on any later operation
    with pytest.raises(StorageError) as info:
        unchecked.put_bytes("k", b"x", "text/plain")
    assert "SignatureDoesNotMatch" in str(info.value) and wrong not in str(info.value)
    assert wrong not in unchecked.describe()


def test_s3_missing_bucket(s3_env: SeaweedFS) -> None:
    name = f"missing-{uuid.uuid4().hex[:10]}"
    with pytest.raises(StorageError) as info:
        S3Storage(s3_config(s3_env, bucket=name))
    assert name in str(info.value) and "does not exist" in str(info.value)

    created = S3Storage(s3_config(s3_env, bucket=name, create_bucket=True))
    created.put_bytes("k.txt", b"ok", "text/plain")
    assert created.get_bytes("k.txt") == b"ok"
    S3Storage(s3_config(s3_env, bucket=name, create_bucket=True))  # already there: fine


def test_s3_unreachable_endpoint(s3_env: SeaweedFS) -> None:
    from testing.seaweedfs import free_ports

    (port,) = free_ports(1)
    config = s3_config(s3_env, endpoint_url=f"http://127.0.0.1:{port}")
    store = S3Storage(config, check=False)
    with pytest.raises(StorageError) as info:
        store.get_bytes("k")
    assert f"127.0.0.1:{port}" in str(info.value)
