-- The job store's SQL, one named query per block (see queries.py for the format). Grouped like the operations:
-- submit and queue reads; claims, leases and fencing; progress and logs; results and checkpoints; webhooks;
-- retention and maintenance leases; limits and service-wide values.

-- ==== submit and queue reads ==========================================================================

-- name: submit_counts
-- Under the submit lock: queued jobs in all, of this key, and ahead of a new job of this priority.
SELECT (SELECT count(*) FROM jobs
        INDEXED BY jobs_queue_order  -- sqlite
        WHERE status = 'IN_QUEUE') AS queued,
       (SELECT count(*) FROM jobs WHERE status = 'IN_QUEUE' AND owner = :owner) AS mine,
       (SELECT count(*) FROM jobs WHERE status = 'IN_QUEUE' AND priority <= :priority) AS ahead

-- name: insert_queued_job
INSERT INTO jobs (request_id, app_id, owner, kind, status, priority, input, input_keys, seed, webhook_url,
                  created_at, start_deadline, stage, max_attempts, result_keys, inputs_purged, log_seq,
                  model_fingerprint)
VALUES (:request_id, :app_id, :owner, 'queue', 'IN_QUEUE', :priority, :input, :input_keys, :seed, :webhook_url,
        jobs_now(), jobs_now() + :start_timeout_s, 'queued', :max_attempts, '[]', :inputs_purged, 1,
        :model_fingerprint)

-- name: insert_sync_job
-- A sync request's row, already running under the caller's lease (epoch 1, one attempt).
INSERT INTO jobs (request_id, app_id, owner, kind, status, priority, input, input_keys, seed, created_at,
                  started_at, stage, attempts, max_attempts, epoch, lease_owner, lease_expires_at, result_keys,
                  inputs_purged, log_seq, model_fingerprint)
VALUES (:request_id, :app_id, :owner, 'sync', 'IN_PROGRESS', 0, :input, :input_keys, :seed, jobs_now(),
        jobs_now(), 'starting', 1, 1, 1, :runner_id, jobs_now() + :lease_s, '[]', :inputs_purged, 1,
        :model_fingerprint)
RETURNING {claim_columns}

-- name: idempotency_key
-- What an Idempotency-Key of this owner created within its window.
SELECT body_hash, request_id FROM idempotency_keys
WHERE owner = :owner AND key = :key AND expires_at > jobs_now()

-- name: remember_idempotency_key
-- Inserted in the transaction that creates the job (an expired row for the same key is replaced).
INSERT INTO idempotency_keys (owner, key, body_hash, request_id, created_at, expires_at)
VALUES (:owner, :key, :body_hash, :request_id, jobs_now(), jobs_now() + :ttl_s)
ON CONFLICT (owner, key) DO UPDATE SET body_hash = excluded.body_hash, request_id = excluded.request_id,
    created_at = excluded.created_at, expires_at = excluded.expires_at

-- name: prune_idempotency_keys
-- Up to ``limit`` expired keys, oldest first (every keyed submit removes a few; the sweeper removes the rest).
DELETE FROM idempotency_keys WHERE (owner, key) IN (
    SELECT owner, key FROM idempotency_keys WHERE expires_at <= jobs_now() ORDER BY expires_at LIMIT :limit)

-- name: announce_queued
-- Wake the runners of this model waiting on LISTEN (delivered at commit; polling finds the job on SQLite).
SELECT pg_notify('stable_avatar_jobs', :model_fingerprint)  -- postgres

-- name: get_job
SELECT {view_columns}, seq FROM jobs WHERE request_id = :request_id AND owner = :owner

-- name: job_place
-- Where a job stands in the queue; ``owner`` NULL reads any owner's job.
SELECT status, priority, seq FROM jobs WHERE request_id = :request_id AND (CAST(:owner AS text) IS NULL OR owner = :owner)

-- name: queue_position
-- Queued jobs ahead in dispatch order: range counts on the (priority, seq) queue index.
SELECT (SELECT count(*) FROM jobs WHERE status = 'IN_QUEUE' AND priority < :priority)
     + (SELECT count(*) FROM jobs WHERE status = 'IN_QUEUE' AND priority = :priority AND seq < :seq) AS n

-- name: job_exists
SELECT 1 AS ok FROM jobs WHERE request_id = :request_id AND owner = :owner

-- name: read_logs
SELECT line, ts, level, source, message FROM job_logs
WHERE request_id = :request_id AND line > :since ORDER BY line LIMIT :limit

-- name: queued_total
-- SQLite without ANALYZE statistics would count through the (owner, status) index: the partial one holds
-- queued rows only.
SELECT count(*) AS n FROM jobs
INDEXED BY jobs_queue_order  -- sqlite
WHERE status = 'IN_QUEUE'

-- name: running_total
SELECT count(*) AS n FROM jobs
INDEXED BY jobs_running_owner  -- sqlite
WHERE status = 'IN_PROGRESS'

-- name: running_of_owner
SELECT count(*) AS n FROM jobs WHERE status = 'IN_PROGRESS' AND owner = :owner

-- name: queued_of_owner
SELECT count(*) AS n FROM jobs WHERE status = 'IN_QUEUE' AND owner = :owner

-- name: lock_job_of_owner
SELECT status, cancel_requested FROM jobs WHERE request_id = :request_id AND owner = :owner
FOR UPDATE  -- postgres

-- name: request_cancel
UPDATE jobs SET cancel_requested = TRUE WHERE request_id = :request_id

-- ==== claims, leases and fencing ======================================================================

-- name: running_by_owner
SELECT owner, count(*) AS n FROM jobs
INDEXED BY jobs_running_owner  -- sqlite
WHERE status = 'IN_PROGRESS' GROUP BY owner

-- name: claim_candidate_of_idle_keys
-- The first queued job of ``model_fingerprint``, in (priority, seq) order, of a key outside ``owners`` (the keys
-- running jobs, and those at their cap), locked for this claim; ``late``: it missed its start deadline.
SELECT request_id, owner, attempts, max_attempts,
       CASE WHEN started_at IS NULL AND start_deadline < jobs_now() THEN 1 ELSE 0 END AS late
FROM jobs
INDEXED BY jobs_claim_order  -- sqlite
WHERE status = 'IN_QUEUE' AND model_fingerprint = :model_fingerprint
  AND (not_before IS NULL OR not_before <= jobs_now())
  AND owner NOT IN (SELECT value FROM json_each(:owners))  -- sqlite
  AND owner <> ALL (CAST(:owners AS text[]))  -- postgres
ORDER BY priority, seq LIMIT 1
FOR UPDATE SKIP LOCKED  -- postgres

-- name: claim_candidate_of_keys
-- The same among ``owners`` only (keys running equally many jobs), through the per-key queue index.
SELECT request_id, owner, attempts, max_attempts,
       CASE WHEN started_at IS NULL AND start_deadline < jobs_now() THEN 1 ELSE 0 END AS late
FROM jobs
INDEXED BY jobs_queued_by_owner  -- sqlite
WHERE status = 'IN_QUEUE' AND model_fingerprint = :model_fingerprint
  AND (not_before IS NULL OR not_before <= jobs_now())
  AND owner IN (SELECT value FROM json_each(:owners))  -- sqlite
  AND owner = ANY (CAST(:owners AS text[]))  -- postgres
ORDER BY priority, seq LIMIT 1
FOR UPDATE SKIP LOCKED  -- postgres

-- name: start_job
UPDATE jobs SET status = 'IN_PROGRESS', epoch = epoch + 1, attempts = attempts + 1, lease_owner = :runner_id,
    lease_expires_at = jobs_now() + :lease_s, started_at = COALESCE(started_at, jobs_now()), stage = 'starting',
    log_seq = log_seq + 1
WHERE request_id = :request_id
RETURNING {claim_columns}, log_seq, checkpoint_fingerprint

-- name: forget_checkpoint
-- A checkpoint another model wrote cannot be resumed: the row stops naming it (retention sweeps the object).
UPDATE jobs SET checkpoint_key = NULL, checkpoint_step = NULL, checkpoint_fingerprint = NULL
WHERE request_id = :request_id

-- name: expired_leases
SELECT request_id, kind, epoch, attempts, max_attempts, cancel_requested, lease_owner, model_fingerprint FROM jobs
WHERE status = 'IN_PROGRESS' AND lease_expires_at < jobs_now() ORDER BY lease_expires_at LIMIT :limit
FOR UPDATE SKIP LOCKED  -- postgres

-- name: requeue_expired
UPDATE jobs SET status = 'IN_QUEUE', stage = 'queued', lease_owner = NULL, lease_expires_at = NULL
WHERE request_id = :request_id AND epoch = :epoch AND status = 'IN_PROGRESS'

-- name: late_jobs
SELECT request_id FROM jobs
WHERE status = 'IN_QUEUE' AND start_deadline IS NOT NULL AND start_deadline < jobs_now() AND started_at IS NULL
ORDER BY start_deadline LIMIT :limit
FOR UPDATE SKIP LOCKED  -- postgres

-- name: heartbeat
UPDATE jobs SET lease_expires_at = jobs_now() + :lease_s
WHERE request_id = :request_id AND epoch = :epoch AND status = 'IN_PROGRESS'
RETURNING cancel_requested

-- name: lock_running_job
-- The job as its lease holder sees it, locked until commit; no row: this epoch no longer holds the lease.
SELECT kind, attempts, max_attempts, cancel_requested, checkpoint_key, lease_owner FROM jobs
WHERE request_id = :request_id AND epoch = :epoch AND status = 'IN_PROGRESS'
FOR UPDATE  -- postgres

-- name: requeue_held_job
-- The lease holder lets go: queued again in its old place, claimable after ``backoff_s`` (NULL: at once), with
-- ``refund`` attempts given back.
UPDATE jobs SET status = 'IN_QUEUE', stage = 'queued', lease_owner = NULL, lease_expires_at = NULL,
    attempts = attempts - :refund, not_before = jobs_now() + :backoff_s
WHERE request_id = :request_id
RETURNING {view_columns}

-- ==== attempts, retries and dead letters ==============================================================

-- name: insert_attempt
INSERT INTO job_attempts (request_id, epoch, attempt, runner, started_at)
VALUES (:request_id, :epoch, :attempt, :runner, jobs_now())

-- name: trim_attempts
DELETE FROM job_attempts WHERE request_id = :request_id AND epoch <= :through

-- name: end_attempt
UPDATE job_attempts SET ended_at = jobs_now(), outcome = :outcome, error_class = :error_class,
    error_message = :message
WHERE request_id = :request_id AND epoch = :epoch AND ended_at IS NULL

-- name: read_attempts
SELECT {attempt_columns} FROM job_attempts WHERE request_id = :request_id ORDER BY epoch

-- name: dead_letters
-- Jobs failed because they ran out of attempts, the latest first.
SELECT {view_columns} FROM jobs WHERE dead_letter ORDER BY completed_at DESC LIMIT :limit

-- name: requeue_dead_letter
-- An operator's second chance: queued again in its old place with a fresh allowance of attempts and a fresh start
-- (the job deadline counts from the next start). Refused (no row) once retention deleted its inputs.
UPDATE jobs SET status = 'IN_QUEUE', stage = 'queued', attempts = 0, dead_letter = FALSE, outcome = NULL,
    error = NULL, completed_at = NULL, not_before = NULL, started_at = NULL,
    model_fingerprint = COALESCE(:model_fingerprint, model_fingerprint)
WHERE request_id = :request_id AND dead_letter AND status = 'COMPLETED'
  AND (NOT inputs_purged OR input_keys = '[]')  -- a job without input objects starts out 'purged'
RETURNING {view_columns}

-- name: retarget_queued
-- Operators: move queued jobs of a model fingerprint nobody serves any more onto another (they start over there:
-- their checkpoints are the old model's).
UPDATE jobs SET model_fingerprint = :to_fingerprint
WHERE status = 'IN_QUEUE' AND model_fingerprint = :from_fingerprint
RETURNING request_id

-- ==== progress and logs ===============================================================================

-- name: report_progress
-- A fenced write of the lease holder: stage, progress, lease and ``lines`` log line numbers taken at once.
UPDATE jobs SET stage = COALESCE(:stage, stage), progress = COALESCE(:progress, progress),
    lease_expires_at = COALESCE(jobs_now() + :lease_s, lease_expires_at), log_seq = log_seq + :lines
WHERE request_id = :request_id AND epoch = :epoch AND status = 'IN_PROGRESS'
RETURNING cancel_requested, log_seq

-- name: take_log_lines
-- Line numbers for lines written by the store itself (no fence: a cancel, a webhook outcome).
UPDATE jobs SET log_seq = log_seq + :lines WHERE request_id = :request_id RETURNING log_seq

-- name: insert_log_line
INSERT INTO job_logs (request_id, line, ts, level, source, message)
VALUES (:request_id, :line, jobs_now(), :level, :source, :message)

-- name: trim_logs
DELETE FROM job_logs WHERE request_id = :request_id AND line <= :through

-- ==== results and checkpoints =========================================================================

-- name: finish_job
-- COMPLETED with a result or an error if still in ``expect_status`` (and, given, at ``epoch``).
UPDATE jobs SET status = 'COMPLETED', completed_at = jobs_now(), outcome = :outcome, stage = :stage,
    progress = COALESCE(:progress, progress), result = :result, result_keys = :result_keys,
    result_purged = :result_purged, error = :error, lease_owner = NULL, lease_expires_at = NULL,
    log_seq = log_seq + 1, dead_letter = :dead_letter
WHERE request_id = :request_id AND status = :expect_status AND (CAST(:epoch AS bigint) IS NULL OR epoch = :epoch)
RETURNING {view_columns}

-- name: completion
-- The job, and how this epoch's attempt ended (NULL: not yet, or no such attempt).
SELECT {view_columns},
       (SELECT outcome FROM job_attempts
        WHERE job_attempts.request_id = :request_id AND job_attempts.epoch = :epoch) AS attempt_outcome
FROM jobs WHERE request_id = :request_id

-- name: set_checkpoint
UPDATE jobs SET checkpoint_key = :key, checkpoint_step = :step, checkpoint_fingerprint = model_fingerprint
WHERE request_id = :request_id

-- ==== webhooks (an outbox row is owed in the transaction that finishes the job) ========================

-- name: owe_webhook
INSERT INTO webhooks (request_id, url, state, next_attempt_at, created_at, updated_at)
VALUES (:request_id, :url, 'pending', jobs_now(), jobs_now(), jobs_now())
ON CONFLICT (request_id) DO NOTHING

-- name: due_webhooks
SELECT request_id FROM webhooks WHERE state = 'pending' AND next_attempt_at <= jobs_now()
ORDER BY next_attempt_at LIMIT :limit
FOR UPDATE SKIP LOCKED  -- postgres

-- name: lease_webhook
-- Counts an attempt; the delivery is due again when the lease runs out (its worker died).
UPDATE webhooks SET attempts = attempts + 1, lease_owner = :worker_id, lease_expires_at = jobs_now() + :lease_s,
    next_attempt_at = jobs_now() + :lease_s, updated_at = jobs_now()
WHERE request_id = :request_id
RETURNING request_id, url, attempts, lease_expires_at,
          (SELECT owner FROM jobs WHERE jobs.request_id = webhooks.request_id) AS owner

-- name: settle_webhook
-- The outcome of attempt ``attempt`` (refused once a newer attempt took the delivery): ``state`` delivered,
-- failed for good, or still pending and due again in ``retry_in_s``.
UPDATE webhooks SET state = :state, next_attempt_at = COALESCE(jobs_now() + :retry_in_s, next_attempt_at),
    last_error = COALESCE(:error, last_error), lease_owner = NULL, lease_expires_at = NULL, updated_at = jobs_now()
WHERE request_id = :request_id AND attempts = :attempt AND state = 'pending'
RETURNING request_id

-- name: webhook_state
SELECT state, attempts, last_error FROM webhooks WHERE request_id = :request_id

-- ==== retention (the WHERE clauses repeat the partial indexes' predicates, so both databases use them) ==

-- name: expired_results
SELECT request_id, result_keys AS keys FROM jobs
WHERE status = 'COMPLETED' AND NOT result_purged AND completed_at < jobs_now() - :ttl_s
ORDER BY completed_at LIMIT :limit

-- name: expired_inputs
SELECT request_id, input_keys AS keys FROM jobs
WHERE status = 'COMPLETED' AND NOT inputs_purged AND completed_at < jobs_now() - :ttl_s
ORDER BY completed_at LIMIT :limit

-- name: expired_checkpoints
SELECT request_id, checkpoint_key FROM jobs
WHERE status = 'COMPLETED' AND checkpoint_key IS NOT NULL AND completed_at < jobs_now() - :ttl_s
ORDER BY completed_at LIMIT :limit

-- name: expired_jobs
-- Every key a finished row still owns.
SELECT request_id, input_keys, inputs_purged, result_keys, result_purged, checkpoint_key FROM jobs
WHERE status = 'COMPLETED' AND completed_at < jobs_now() - :ttl_s
ORDER BY completed_at LIMIT :limit

-- name: purge_results
UPDATE jobs SET result_purged = TRUE
WHERE request_id IN (SELECT value FROM json_each(:ids))  -- sqlite
WHERE request_id = ANY (CAST(:ids AS text[]))  -- postgres
  AND status = 'COMPLETED' AND NOT result_purged AND completed_at < jobs_now() - :ttl_s

-- name: purge_inputs
UPDATE jobs SET inputs_purged = TRUE
WHERE request_id IN (SELECT value FROM json_each(:ids))  -- sqlite
WHERE request_id = ANY (CAST(:ids AS text[]))  -- postgres
  AND status = 'COMPLETED' AND NOT inputs_purged AND completed_at < jobs_now() - :ttl_s

-- name: purge_checkpoints
UPDATE jobs SET checkpoint_key = NULL, checkpoint_step = NULL
WHERE request_id IN (SELECT value FROM json_each(:ids))  -- sqlite
WHERE request_id = ANY (CAST(:ids AS text[]))  -- postgres
  AND status = 'COMPLETED' AND checkpoint_key IS NOT NULL AND completed_at < jobs_now() - :ttl_s

-- name: purge_jobs
DELETE FROM jobs
WHERE request_id IN (SELECT value FROM json_each(:ids))  -- sqlite
WHERE request_id = ANY (CAST(:ids AS text[]))  -- postgres
  AND status = 'COMPLETED' AND completed_at < jobs_now() - :ttl_s
RETURNING request_id

-- name: delete_logs_of
DELETE FROM job_logs
WHERE request_id IN (SELECT value FROM json_each(:ids))  -- sqlite
WHERE request_id = ANY (CAST(:ids AS text[]))  -- postgres

-- name: delete_idempotency_keys_of
DELETE FROM idempotency_keys
WHERE request_id IN (SELECT value FROM json_each(:ids))  -- sqlite
WHERE request_id = ANY (CAST(:ids AS text[]))  -- postgres

-- name: delete_attempts_of
DELETE FROM job_attempts
WHERE request_id IN (SELECT value FROM json_each(:ids))  -- sqlite
WHERE request_id = ANY (CAST(:ids AS text[]))  -- postgres

-- name: delete_webhooks_of
DELETE FROM webhooks
WHERE request_id IN (SELECT value FROM json_each(:ids))  -- sqlite
WHERE request_id = ANY (CAST(:ids AS text[]))  -- postgres

-- name: keys_read_by_unfinished
-- Of ``keys``, the strings anywhere in the input of a queued or running job (an upload, an earlier result).
WITH wanted(value) AS (
    SELECT value FROM json_each(:keys)  -- sqlite
    SELECT unnest(CAST(:keys AS text[])) AS value  -- postgres
),
unfinished(input) AS (
    SELECT input FROM jobs
    INDEXED BY jobs_queue_order  -- sqlite
    WHERE status = 'IN_QUEUE'
    UNION ALL
    SELECT input FROM jobs
    INDEXED BY jobs_running_owner  -- sqlite
    WHERE status = 'IN_PROGRESS'
)
SELECT DISTINCT s.value AS key FROM unfinished, json_tree(unfinished.input) AS s  -- sqlite
WHERE s.type = 'text' AND s.value IN (SELECT value FROM wanted)  -- sqlite
SELECT DISTINCT s.j #>> ARRAY[]::text[] AS key  -- postgres
FROM unfinished, jsonb_path_query(unfinished.input, 'strict $.**') AS s(j)  -- postgres
WHERE jsonb_typeof(s.j) = 'string' AND s.j #>> ARRAY[]::text[] IN (SELECT value FROM wanted)  -- postgres

-- name: keys_named_by_rows
-- Of ``keys``, those a row names as its own: inputs (of unfinished jobs, and of finished ones not purged),
-- results not purged, checkpoints. Each source is read through its partial index, so the cost follows the rows
-- retention keeps live (and the queue), not the table.
WITH wanted(value) AS (
    SELECT value FROM json_each(:keys)  -- sqlite
    SELECT unnest(CAST(:keys AS text[])) AS value  -- postgres
),
owned(keys, checkpoint_key) AS (
    SELECT input_keys, NULL FROM jobs
    INDEXED BY jobs_finished_inputs  -- sqlite
    WHERE status = 'COMPLETED' AND NOT inputs_purged
    UNION ALL
    SELECT result_keys, NULL FROM jobs
    INDEXED BY jobs_finished_results  -- sqlite
    WHERE status = 'COMPLETED' AND NOT result_purged
    UNION ALL
    SELECT NULL, checkpoint_key FROM jobs
    INDEXED BY jobs_finished_checkpoints  -- sqlite
    WHERE status = 'COMPLETED' AND checkpoint_key IS NOT NULL
    UNION ALL
    SELECT input_keys, checkpoint_key FROM jobs
    INDEXED BY jobs_queue_order  -- sqlite
    WHERE status = 'IN_QUEUE'
    UNION ALL
    SELECT input_keys, checkpoint_key FROM jobs
    INDEXED BY jobs_running_owner  -- sqlite
    WHERE status = 'IN_PROGRESS'
)
SELECT e.value AS key FROM owned, json_each(owned.keys) AS e  -- sqlite
SELECT e.value AS key FROM owned, jsonb_array_elements_text(owned.keys) AS e(value)  -- postgres
WHERE e.value IN (SELECT value FROM wanted)
UNION
SELECT checkpoint_key FROM owned WHERE checkpoint_key IN (SELECT value FROM wanted)

-- ==== maintenance leases (one process of all sharing the database runs a periodic task) ===============

-- name: acquire_lease
INSERT INTO maintenance_leases (name, owner, epoch, expires_at, updated_at)
VALUES (:name, :owner, 1, jobs_now() + :lease_s, jobs_now())
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, epoch = maintenance_leases.epoch + 1,
    expires_at = excluded.expires_at, updated_at = excluded.updated_at
WHERE maintenance_leases.expires_at <= excluded.updated_at OR maintenance_leases.owner = excluded.owner
RETURNING epoch

-- name: extend_lease
-- Renew (``for_s`` the lease time) or end (``for_s`` 0, or how long nobody else may run the task) a held lease.
UPDATE maintenance_leases SET expires_at = jobs_now() + :for_s, updated_at = jobs_now()
WHERE name = :name AND owner = :owner AND epoch = :epoch
RETURNING name

-- name: lease_holder
SELECT owner, epoch, expires_at FROM maintenance_leases WHERE name = :name

-- ==== limits and service-wide values ==================================================================

-- name: take_rate_token
-- Refill the key's bucket at ``rate`` per second up to ``burst``, then take a token, in one upsert; a bucket
-- left below zero means refused (the caller's transaction rolls back, so a refusal spends nothing).
INSERT INTO rate_buckets (owner, tokens, updated_at) VALUES (:owner, :burst - 1, jobs_now())
ON CONFLICT (owner) DO UPDATE SET
    tokens = min(:burst, rate_buckets.tokens + max(0, jobs_now() - rate_buckets.updated_at) * :rate) - 1,  -- sqlite
    updated_at = max(rate_buckets.updated_at, jobs_now())  -- sqlite
    tokens = LEAST(:burst, rate_buckets.tokens + GREATEST(0, jobs_now() - rate_buckets.updated_at) * :rate) - 1,  -- postgres
    updated_at = GREATEST(rate_buckets.updated_at, jobs_now())  -- postgres
RETURNING tokens

-- name: prune_rate_buckets
-- Buckets idle long enough to be full again are the same as no row.
DELETE FROM rate_buckets WHERE updated_at < jobs_now() - :idle_s

-- name: upload_usage_of
-- What an owner's live uploads hold: bytes (reserved or stored) and how many.
SELECT COALESCE(sum(bytes), 0) AS bytes, count(*) AS uploads FROM upload_usage
WHERE owner = :owner AND expires_at > jobs_now()

-- name: reserve_upload
-- Held for ``hold_s`` only until it is settled: the reservation of a Gateway that died mid-upload frees itself.
INSERT INTO upload_usage (key, owner, bytes, created_at, expires_at)
VALUES (:key, :owner, :bytes, jobs_now(), jobs_now() + :hold_s)

-- name: settle_upload
-- The stored size, counted until retention deletes the upload (``ttl_s`` after it was made); written again if the
-- reservation's hold ran out during a slow upload.
INSERT INTO upload_usage (key, owner, bytes, created_at, expires_at)
VALUES (:key, :owner, :bytes, jobs_now(), jobs_now() + :ttl_s)
ON CONFLICT (key) DO UPDATE SET bytes = :bytes, expires_at = upload_usage.created_at + :ttl_s

-- name: forget_upload
DELETE FROM upload_usage WHERE key = :key

-- name: prune_upload_usage
-- Up to ``limit`` rows of uploads retention has deleted by now (their bytes no longer count).
DELETE FROM upload_usage WHERE key IN (
    SELECT key FROM upload_usage WHERE expires_at <= jobs_now() ORDER BY expires_at LIMIT :limit)

-- name: ping
SELECT 1 AS ok

-- name: create_secret
INSERT INTO service_secrets (name, value, created_at) VALUES (:name, :value, jobs_now())
ON CONFLICT (name) DO NOTHING

-- name: read_secret
SELECT value FROM service_secrets WHERE name = :name
