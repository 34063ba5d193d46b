"""The suite's tiers, by what a test needs (a pytest plugin: ``tests/conftest.py`` loads it).

Markers (registered in ``pyproject.toml``), put on every test at collection from the fixtures it uses, so a new
test lands in its tier without ceremony:

- ``serve``: a Ray cluster (the ``serve_cluster`` fixture; a module that starts a cluster of its own says so with
  ``pytestmark = pytest.mark.serve``);
- ``soak``: the chaos soak (also ``serve``);
- ``database``: the PostgreSQL or SeaweedFS S3 server (``postgres``, ``seaweedfs``, ``s3_env``);
- ``golden``: the upstream golden vectors (``golden``);
- ``unit``: none of these.

``make test-fast`` runs ``-m "not serve"`` (no Ray); ``make test`` runs everything. A test that starts Ray without
the ``serve`` marker fails, naming the marker, instead of slowing the fast tier down unnoticed.

Collection order: tests without Ray first (quick failures first), then the tests on the shared cluster, then the
modules with a cluster of their own (each stops the shared one), then the soak. A module's tests keep their order.

``make test`` runs two pytest-xdist workers that take whole modules (``-n 2 --dist loadfile
--no-loadscope-reorder``) in the reverse order, the longest first: the soak, the modules with a cluster of their
own, those on the shared cluster (each worker starts its own), the rest. The Serve tests' waiting for replicas,
leases and clients then overlaps with the CPU work of the others, and no worker is left alone with the soak at
the end. A worker drives at most one Ray cluster at a time. Within a tier, on xdist workers, the modules marked
``long`` (``pytestmark = pytest.mark.long``: a minute or more in all, whole tools at tiny size) go first, for the same
reason; ``make test-fast`` keeps this order too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

NEEDS: dict[str, frozenset[str]] = {  # marker: the fixtures that imply it
    "serve": frozenset({"serve_cluster"}),
    "database": frozenset({"postgres", "seaweedfs", "s3_env"}),
    "golden": frozenset({"golden"}),
}
TIERS = ("unit", "golden", "database", "serve", "soak")


def _add_markers(item: pytest.Item) -> None:
    fixtures = set(getattr(item, "fixturenames", ()))
    for name, implied_by in NEEDS.items():
        if fixtures & implied_by and item.get_closest_marker(name) is None:
            item.add_marker(name)
    if item.get_closest_marker("soak") is not None and item.get_closest_marker("serve") is None:
        item.add_marker("serve")
    if not any(item.get_closest_marker(name) for name in TIERS):
        item.add_marker("unit")


def _run_order(item: pytest.Item) -> int:
    """0: no Ray; 1: the shared cluster; 2: a cluster of its own; 3: the soak."""
    if item.get_closest_marker("soak") is not None:
        return 3
    if item.get_closest_marker("serve") is None:
        return 0
    return 1 if "serve_cluster" in getattr(item, "fixturenames", ()) else 2


def in_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")  # pytest-xdist's mark of a worker process


def run_order(item: pytest.Item) -> tuple[int, int]:
    """Where ``item`` runs, as a sort key: tiers ascending in one process; on xdist workers the tiers descending and
    the ``long`` modules first within each (the longest work first, so the workers end together)."""
    if not in_xdist_worker(item.config):
        return _run_order(item), 0
    return -_run_order(item), 0 if item.get_closest_marker("long") is not None else 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        _add_markers(item)
    items.sort(key=run_order)  # stable: a module's tests keep their order


class RayInUnmarkedTest(RuntimeError):
    pass


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Outside the ``serve`` tier, starting or joining Ray (``ray.init``, also what ``ray.put`` or a remote call does
    on its own) raises, in the test and in every fixture it sets up, module-scoped ones included."""
    if item.get_closest_marker("serve") is not None:
        return (yield)
    import ray

    def refuse(*args, **kwargs):
        raise RayInUnmarkedTest(
            f"{item.nodeid} starts Ray but is not in the serve tier: use the serve_cluster fixture, or mark a "
            "module with a cluster of its own `pytestmark = pytest.mark.serve` (testing/tiers.py)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "init", refuse)
        return (yield)
