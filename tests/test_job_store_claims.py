"""Which job a claim takes, on SQLite and PostgreSQL: fair between API keys (the key running the fewest jobs
first, then priority, then age), within each key's running cap, and only jobs of the claiming application's model
fingerprint (whose checkpoints alone it resumes)."""

from __future__ import annotations

import time

from deployments.jobstore import SyncJobStore
from tests.job_store_env import INPUT, Env, env_fixture, log_messages, submit  # noqa: F401


def claim_all(store: SyncJobStore, model_fingerprint: str = "") -> list[str]:
    """Claim until nothing is claimable; the ids in claim order (nothing finishes meanwhile)."""
    order = []
    while (job := store.claim(f"r{len(order)}", 30, model_fingerprint=model_fingerprint)) is not None:
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


# -- model fingerprints -------------------------------------------------------------------------------------------
def test_a_claim_takes_only_jobs_submitted_to_its_own_model_fingerprint(env: Env):
    store = env.open()
    old = [submit(store, model_fingerprint="weights-v1") for _ in range(2)]
    new = submit(store, model_fingerprint="weights-v2")
    unmarked = submit(store)
    assert store.claim("new-cluster", 30, model_fingerprint="weights-v2").request_id == new
    assert store.claim("new-cluster", 30, model_fingerprint="weights-v2") is None  # the old jobs are not its own
    assert [store.claim("old-cluster", 30, model_fingerprint="weights-v1").request_id for _ in old] == old
    job = store.claim("old-cluster", 30)
    assert (job.request_id, job.model_fingerprint) == (unmarked, "")
    sync = store.create_sync(app_id="a", input=INPUT, seed=1, runner_id="g", lease_s=30, owner="k1",
                             rate_limited=False, model_fingerprint="weights-v2")
    assert sync.model_fingerprint == "weights-v2" == store.get(sync.request_id, "k1").model_fingerprint


def test_an_expired_job_resumes_only_on_its_model_and_another_models_checkpoint_is_never_resumed(env: Env):
    store = env.open(max_attempts=2)
    job_id = submit(store, model_fingerprint="weights-v1")
    first = store.claim("old-a", 0.2, model_fingerprint="weights-v1")
    key = f"checkpoints/{job_id}/e1/s3.pt"
    store.record_checkpoint(job_id, first.epoch, key, 3)
    time.sleep(0.3)
    assert store.claim("new-a", 30, model_fingerprint="weights-v2") is None  # expired, re-queued, not its own
    again = store.claim("old-b", 0.2, model_fingerprint="weights-v1")
    assert (again.request_id, again.checkpoint_key, again.checkpoint_step) == (job_id, key, 3)
    time.sleep(0.3)
    assert store.expire_leases() == 1 and store.get(job_id, "k1").dead_letter  # the old cluster is gone
    assert store.named_keys([key]) == {key}

    store.requeue(job_id, model_fingerprint="weights-v2")  # an operator moves it to the new model
    moved = store.claim("new-a", 30, model_fingerprint="weights-v2")
    assert (moved.request_id, moved.checkpoint_key, moved.checkpoint_step) == (job_id, None, None)
    assert store.named_keys([key]) == set()  # unnamed: retention sweeps the old model's object
    assert "its checkpoint was written by another model; it starts over" in log_messages(store, job_id)
    store.record_checkpoint(job_id, moved.epoch, f"checkpoints/{job_id}/e3/s1.pt", 1)
    store.release(job_id, moved.epoch, "shutting down")
    resumed = store.claim("new-b", 30, model_fingerprint="weights-v2")
    assert (resumed.checkpoint_key, resumed.checkpoint_step) == (f"checkpoints/{job_id}/e3/s1.pt", 1)


def test_an_operator_moves_the_queue_of_a_removed_application_to_another_model(env: Env):
    store = env.open()
    stranded = [submit(store, model_fingerprint="weights-v1") for _ in range(2)]
    other = submit(store, model_fingerprint="weights-v3")
    assert store.retarget("weights-v1", "weights-v2") == 2
    assert claim_all(store, "weights-v2") == stranded
    assert claim_all(store, "weights-v1") == []
    assert store.get(other, "k1").model_fingerprint == "weights-v3"
    assert "moved by an operator to another model; it starts over" in log_messages(store, stranded[0])

