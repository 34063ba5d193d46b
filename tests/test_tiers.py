"""The suite's tiers (testing/tiers.py): every collected test is in one, by the fixtures it uses; Ray is refused
outside the serve tier; the tests without Ray run first."""

from __future__ import annotations

import pytest

from testing.tiers import TIERS, RayInUnmarkedTest, in_xdist_worker, run_order


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


def test_ray_is_refused_outside_the_serve_tier():
    import ray

    connected = ray.is_initialized()  # an xdist worker may hold the shared cluster of an earlier module
    with pytest.raises(RayInUnmarkedTest, match="not in the serve tier"):
        ray.init(address="local", num_cpus=1)
    assert ray.is_initialized() == connected
