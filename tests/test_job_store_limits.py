"""Per-key state that protects the service, on SQLite and PostgreSQL: idempotency keys (a retried submit never
queues a second GPU job) and the upload quota, each with its time to live."""

from __future__ import annotations

import hashlib
import pickle
import time

import pytest

from deployments.jobstore import (
    AlreadySubmittedError,
    IdempotencyKeyReusedError,
    NotDeadLetteredError,
    UploadQuotaError,
    UploadUsage,
)
from tests.job_store_env import INPUT, Env, env_fixture, sql, submit, together  # noqa: F401

BODY = hashlib.sha256(b'{"prompt": "hi"}').hexdigest()
OTHER_BODY = hashlib.sha256(b'{"prompt": "bye"}').hexdigest()


def test_a_retried_submit_returns_the_first_job_and_queues_nothing(env: Env):
    store = env.open(rate_per_s=0.001, rate_burst=5, max_queue_length=2)
    ahead = submit(store, "k2")
    first = store.submit(app_id="a", input=INPUT, seed=1, owner="k1", idempotency_key="retry-1", body_hash=BODY)
    assert (first.queue_position, first.replayed) == (1, False)
    tokens = sql(store, "SELECT tokens FROM rate_buckets WHERE owner = ?", ("k1",))[0]["tokens"]
    again = store.submit(app_id="a", input=INPUT, seed=1, owner="k1", idempotency_key="retry-1", body_hash=BODY)
    assert (again.request_id, again.queue_position, again.replayed) == (first.request_id, 1, True)
    assert store.queue_length() == 2  # the queue is full now, yet the retry answers: it asks for nothing new
    assert sql(store, "SELECT tokens FROM rate_buckets WHERE owner = ?", ("k1",))[0]["tokens"] == \
        pytest.approx(tokens, abs=0.01)  # and spends no token
    store.claim("r", 30)
    assert store.submit(app_id="a", input=INPUT, seed=1, owner="k1", idempotency_key="retry-1",
                        body_hash=BODY).queue_position == 0  # the answer is where that job stands now
    assert ahead != first.request_id

    with pytest.raises(IdempotencyKeyReusedError, match="different request body"):
        store.submit(app_id="a", input=INPUT, seed=2, owner="k1", idempotency_key="retry-1", body_hash=OTHER_BODY)
    # another owner's key of the same name is its own: a new job
    other = store.submit(app_id="a", input=INPUT, seed=1, owner="k3", idempotency_key="retry-1", body_hash=BODY)
    assert other.request_id != first.request_id and not other.replayed
    assert sql(store, "SELECT count(*) AS n FROM jobs")[0]["n"] == 3


def test_concurrent_retries_from_two_applications_create_one_job(env: Env):
    stores = [env.open(), env.open()]
    answers = together(8, lambda i: stores[i % 2].submit(app_id="a", input=INPUT, seed=1, owner="k1",
                                                        idempotency_key="burst", body_hash=BODY,
                                                        rate_limited=False))
    assert {a.request_id for a in answers} == {answers[0].request_id}
    assert sorted(a.replayed for a in answers) == [False] + [True] * 7
    assert stores[0].queue_length() == 1


def test_an_idempotency_key_answers_for_its_window_only_and_goes_with_its_job(env: Env):
    window_s = 1.0  # long enough for the few calls that must land inside it on a loaded database
    store = env.open(idempotency_ttl_s=window_s)
    first = store.submit(app_id="a", input=INPUT, seed=1, owner="k1", idempotency_key="k", body_hash=BODY,
                         rate_limited=False)
    leftover = store.submit(app_id="a", input=INPUT, seed=1, owner="k1", idempotency_key="old", body_hash=BODY,
                            rate_limited=False)
    time.sleep(window_s + 0.1)
    second = store.submit(app_id="a", input=INPUT, seed=1, owner="k1", idempotency_key="k", body_hash=OTHER_BODY,
                          rate_limited=False)  # the window closed: the key starts a new job, with any body
    assert second.request_id != first.request_id and not second.replayed
    assert sql(store, "SELECT count(*) AS n FROM idempotency_keys")[0]["n"] == 1  # expired ones were pruned
    assert leftover.request_id not in {r["request_id"] for r in sql(store, "SELECT request_id FROM idempotency_keys")}
    assert store.prune_idempotency_keys() == 0
    time.sleep(window_s + 0.1)
    assert store.prune_idempotency_keys() == 1 and sql(store, "SELECT count(*) AS n FROM idempotency_keys")[0]["n"] == 0

    store = env.open(idempotency_ttl_s=3600)
    job_id = store.submit(app_id="a", input=INPUT, seed=1, owner="k2", idempotency_key="kept", body_hash=BODY,
                          rate_limited=False).request_id
    store.cancel(job_id, "k2")
    time.sleep(0.2)
    assert store.purge("jobs", [job_id], 0.1) == 1  # retention deleted the job: its key goes with it
    assert sql(store, "SELECT count(*) AS n FROM idempotency_keys WHERE owner = ?", ("k2",))[0]["n"] == 0


def test_a_repeated_sync_request_names_the_job_already_running_for_it(env: Env):
    store = env.open()
    running = store.create_sync(app_id="a", input=INPUT, seed=1, runner_id="g", lease_s=30, owner="k1",
                                rate_limited=False, idempotency_key="run-1", body_hash=BODY)
    with pytest.raises(AlreadySubmittedError) as repeated:
        store.create_sync(app_id="a", input=INPUT, seed=1, runner_id="g", lease_s=30, owner="k1",
                          rate_limited=False, idempotency_key="run-1", body_hash=BODY)
    assert repeated.value.request_id == running.request_id
    with pytest.raises(IdempotencyKeyReusedError):
        store.create_sync(app_id="a", input=INPUT, seed=1, runner_id="g", lease_s=30, owner="k1",
                          rate_limited=False, idempotency_key="run-1", body_hash=OTHER_BODY)
    assert store.running_count("k1") == 1


def test_malformed_idempotency_arguments_are_refused_before_any_work():
    from deployments.jobstore.operations.idempotency import check_idempotency

    check_idempotency(None, None)
    check_idempotency("Ab0-_.:~!", BODY)
    for key, body_hash, field in (("has space", BODY, "idempotency_key"), ("", BODY, "idempotency_key"),
                                  ("x" * 256, BODY, "idempotency_key"), ("k", "abc", "body_hash"),
                                  ("k", None, "body_hash"), (None, BODY, "idempotency_key")):
        with pytest.raises(ValueError, match=field):
            check_idempotency(key, body_hash)


def test_the_new_store_errors_survive_pickling_with_their_fields():
    for error in (IdempotencyKeyReusedError("k"), AlreadySubmittedError("a" * 32), NotDeadLetteredError("b" * 32),
                  UploadQuotaError("over")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and vars(copy) == vars(error)


# -- upload quota -------------------------------------------------------------------------------------------------
def test_the_upload_quota_holds_across_gateways_and_counts_what_storage_keeps(env: Env):
    ttl_s = 2.0  # long enough for the calls below to land inside it on a loaded database
    stores = [env.open(upload_quota_bytes=1000, upload_ttl_s=ttl_s, max_uploads_per_owner=4) for _ in range(2)]
    answers = together(8, lambda i: stores[i % 2].reserve_upload("k1", f"uploads/k1/u{i}/face.png", 300))
    assert sorted(a for a in answers if isinstance(a, int)) == [300, 300, 300]  # exact across two Gateways
    refused = [a for a in answers if isinstance(a, UploadQuotaError)]
    assert len(refused) == 5 and "quota of 1000 bytes" in str(refused[0])
    store = stores[0]
    assert store.upload_usage("k1") == UploadUsage(bytes=900, uploads=3)
    assert store.upload_usage("k2") == UploadUsage(bytes=0, uploads=0)
    kept = [f"uploads/k1/u{i}/face.png" for i, a in enumerate(answers) if isinstance(a, int)]
    store.settle_upload("k1", kept[0], 100)  # the body was smaller than reserved
    store.settle_upload("k1", kept[1], 0)  # the upload failed: nothing is kept
    assert store.upload_usage("k1") == UploadUsage(bytes=400, uploads=2)
    assert store.reserve_upload("k1", "uploads/k1/big/a.wav", 5000, fit=True) == 600  # size unknown: what is left
    with pytest.raises(UploadQuotaError):
        store.reserve_upload("k1", "uploads/k1/one-more/b.wav", 1, fit=True)
    assert store.reserve_upload("k2", "uploads/k2/u/face.png", 1000) == 1000  # each key has its own quota
    time.sleep(ttl_s + 0.1)  # retention deleted those uploads by now: their bytes no longer count
    assert store.upload_usage("k1").bytes == 0
    assert store.reserve_upload("k1", "uploads/k1/later/face.png", 1000) == 1000
    assert sql(store, "SELECT count(*) AS n FROM upload_usage")[0]["n"] == 1  # the reservation pruned the rest
    time.sleep(ttl_s + 0.1)
    assert store.prune_upload_usage() == 1
    with pytest.raises(ValueError, match="size_bytes"):
        store.reserve_upload("k1", "uploads/k1/x", -1)


def test_an_unsettled_reservation_frees_itself_and_the_upload_count_is_capped(env: Env):
    hold_s = 1.0  # long enough for the call that must land inside it on a loaded database
    store = env.open(upload_quota_bytes=1000, upload_ttl_s=60, upload_hold_s=hold_s, max_uploads_per_owner=2)
    store.reserve_upload("k1", "uploads/k1/a/x.png", 900)  # its Gateway dies before settling it
    with pytest.raises(UploadQuotaError, match="quota of 1000 bytes"):
        store.reserve_upload("k1", "uploads/k1/b/x.png", 200)
    time.sleep(hold_s + 0.1)
    assert store.reserve_upload("k1", "uploads/k1/b/x.png", 200) == 200  # the dead reservation no longer counts
    time.sleep(hold_s + 0.1)  # settled after its hold ran out (a slow upload): it counts again, for the upload TTL
    store.settle_upload("k1", "uploads/k1/b/x.png", 150)
    store.reserve_upload("k1", "uploads/k1/c/x.png", 10)
    assert store.upload_usage("k1") == UploadUsage(bytes=160, uploads=2)
    with pytest.raises(UploadQuotaError, match="holds 2 uploads"):
        store.reserve_upload("k1", "uploads/k1/d/x.png", 1)
