"""The suite's tiers (testing/tiers.py): every collected test is in one, by the fixtures it uses; Ray is refused
outside the serve tier; the tests without Ray run first; a test that hangs fails instead of stopping the run."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from testing.media import REPO_ROOT
from testing.tiers import TIERS, RayInUnmarkedTest, in_xdist_worker, run_order

# A test whose thread never ends (its own limit is 2 s), then one that passes.
HUNG_MODULE = """
import threading, time
import pytest

@pytest.mark.timeout(2)
def test_waits_for_a_thread_that_never_ends():
    stuck = threading.Thread(target=time.sleep, args=(120,), name="stuck-helper", daemon=True)
    stuck.start()
    stuck.join()

def test_runs_after_it():
    pass
"""


def markers(item: pytest.Item) -> set[str]:
    return {name for name in TIERS if item.get_closest_marker(name) is not None}


def test_every_collected_test_has_a_tier_and_unit_only_alone(request):
    for item in request.session.items:
        tiers = markers(item)
        assert tiers, item.nodeid
        assert tiers == {"unit"} or "unit" not in tiers, (item.nodeid, tiers)


def test_the_fixtures_a_test_uses_put_it_in_its_tier(request):
    for item in request.session.items:
        fixtures, tiers = set(item.fixturenames), markers(item)
        if "serve_cluster" in fixtures:
            assert "serve" in tiers, item.nodeid
        if fixtures & {"postgres", "seaweedfs", "s3_env"}:
            assert "database" in tiers, item.nodeid
        if "golden" in fixtures:
            assert "golden" in tiers, item.nodeid
        if "soak" in tiers:
            assert "serve" in tiers, item.nodeid


def test_this_test_is_a_unit_test(request):
    assert markers(request.node) == {"unit"}


def test_the_tests_without_ray_run_first_and_the_soak_last_or_the_reverse_on_xdist_workers(request):
    order = [run_order(item) for item in request.session.items]
    assert order == sorted(order)
    soak = [item for item in request.session.items if item.get_closest_marker("soak") is not None]
    if soak:
        assert request.session.items.index(soak[0]) == (0 if in_xdist_worker(request.config) else len(order) - 1)


class FakeItem:
    """What :func:`run_order` reads of a test: its markers, fixtures and whether it runs on an xdist worker."""

    def __init__(self, markers: set[str], fixtures: tuple[str, ...] = (), on_a_worker: bool = True) -> None:
        self.markers, self.fixturenames = markers, fixtures
        self.config = SimpleNamespace(workerinput={}) if on_a_worker else SimpleNamespace()

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self.markers else None


def test_long_modules_run_first_in_their_tier_on_xdist_workers_and_change_nothing_in_one_process():
    unit, long_unit = FakeItem({"unit"}), FakeItem({"unit", "long"})
    shared, long_shared = FakeItem({"serve"}, ("serve_cluster",)), FakeItem({"serve", "long"}, ("serve_cluster",))
    soak = FakeItem({"soak", "serve"})
    on_workers = sorted([unit, shared, long_unit, soak, long_shared], key=run_order)
    assert on_workers == [soak, long_shared, shared, long_unit, unit]
    in_one_process = [FakeItem(item.markers, item.fixturenames, on_a_worker=False) for item in on_workers]
    assert [run_order(item) for item in in_one_process] == [(3, 0), (1, 0), (1, 0), (0, 0), (0, 0)]


def test_ray_is_refused_outside_the_serve_tier():
    import ray

    connected = ray.is_initialized()  # an xdist worker may hold the shared cluster of an earlier module
    with pytest.raises(RayInUnmarkedTest, match="not in the serve tier"):
        ray.init(address="local", num_cpus=1)
    assert ray.is_initialized() == connected


def test_a_hung_test_fails_with_every_threads_stack_and_the_run_goes_on(request, tmp_path):
    assert float(request.config.getini("timeout")) >= 600  # this suite's limit: above its slowest test
    (tmp_path / "test_hung.py").write_text(HUNG_MODULE)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # the repo's config alone
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                          str(REPO_ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_hung.py")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1, run.stdout
    assert "Timeout (>2.0s)" in run.stdout and "Stack of stuck-helper" in run.stdout, run.stdout
    assert "1 failed, 1 passed" in run.stdout, run.stdout


@pytest.mark.parametrize("next_uses_it,stopped", [(True, False), (False, True), (None, True)])
def test_the_shared_cluster_stops_after_the_last_test_that_uses_it(monkeypatch, next_uses_it, stopped):
    """``None``: the session's last test. A test that needs no cluster ends nothing."""
    import testing.ray_serve
    from testing.fixtures import pytest_runtest_teardown

    stops: list[str] = []
    monkeypatch.setattr(testing.ray_serve, "stop_shared_cluster", lambda: stops.append("stopped"))

    def item(uses: bool) -> SimpleNamespace:
        return SimpleNamespace(fixturenames=["tmp_path", *(["serve_cluster"] if uses else [])])

    nextitem = None if next_uses_it is None else item(next_uses_it)
    for this_uses_it, expected in ((True, ["stopped"] if stopped else []), (False, [])):
        stops.clear()
        teardown = pytest_runtest_teardown(item(this_uses_it), nextitem)
        next(teardown)  # pytest's own teardown runs here
        with pytest.raises(StopIteration):
            teardown.send(None)
        assert stops == expected
