"""Which job a claim takes, on SQLite and PostgreSQL: fair between API keys (the key running the fewest jobs
first, then priority, then age), within each key's running cap."""

from __future__ import annotations

from deployments.jobstore import SyncJobStore
from tests.job_store_env import INPUT, Env, env_fixture, submit  # noqa: F401


def claim_all(store: SyncJobStore) -> list[str]:
    """Claim until nothing is claimable; the ids in claim order (nothing finishes meanwhile)."""
    order = []
    while (job := store.claim(f"r{len(order)}", 30)) is not None:
        order.append(job.request_id)
    return order


def test_claims_take_turns_between_two_keys_instead_of_draining_the_first_backlog(env: Env):
    store = env.open()
    backlog = [submit(store, "k1") for _ in range(4)]  # k1 queued first; strict FIFO would run all four first
    late = [submit(store, "k2") for _ in range(2)]
    assert claim_all(store) == [backlog[0], late[0], backlog[1], late[1], backlog[2], backlog[3]]


def test_between_keys_running_as_many_jobs_priority_then_age_decide(env: Env):
    store = env.open()
    k1_first, k1_second = submit(store, "k1"), submit(store, "k1")
    k2_low = submit(store, "k2", priority="low")
    k2_normal = submit(store, "k2")
    # both keys idle: k1's older normal job; then k2 (idle) before k1 (running one): its normal job first;
    # then both run one: priority picks k1's normal job over k2's low one
    assert claim_all(store) == [k1_first, k2_normal, k1_second, k2_low]


def test_a_key_running_a_sync_request_waits_behind_an_idle_key(env: Env):
    store = env.open()
    store.create_sync(app_id="a", input=INPUT, seed=1, runner_id="gateway", lease_s=30, owner="k1",
                      rate_limited=False)
    older = submit(store, "k1")
    newer = submit(store, "k2")
    assert claim_all(store) == [newer, older]


def test_fair_claims_still_honour_each_keys_running_cap(env: Env):
    store = env.open(max_running_per_owner=2)
    k1 = [submit(store, "k1") for _ in range(4)]
    k2 = submit(store, "k2")
    assert claim_all(store) == [k1[0], k2, k1[1]]  # k1 stops at its cap of two; k2 had one job
    assert store.running_count("k1") == 2 and store.queue_length() == 2
