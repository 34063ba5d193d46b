"""``stable-avatar jobs ...``: the operator's view of the jobs database, read from a Serve config's ``jobs:`` block.

A job that ran out of attempts on infrastructure faults (the database, the storage, dead or hung replicas,
timeouts) is a *dead letter*: failed, with every attempt recorded. Once the cause is fixed, an operator lists the
dead letters and re-queues them; they resume from their last checkpoint. ``retarget`` moves the queue of an
application that was removed before it drained (an upgrade that changed the weights) onto the new one.

These commands talk to the database directly (no server, no Ray) and import no model library.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from stable_avatar.arguments import add_command
from stable_avatar.errors import print_error
from stable_avatar.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED

if TYPE_CHECKING:
    from deployments.jobstore import SyncJobStore

CONFIG_NOTE = ("The database is the one the Serve config's application uses (its args' jobs: block; SQLite by "
               "default, beside its local storage); PostgreSQL's DSN comes from the environment as for the service.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "jobs", "operators: list and re-queue dead letters, move a removed model's queue",
                    f"Operator commands on the jobs database. {CONFIG_NOTE}",
                    ["stable-avatar jobs dead-letters --config serve_config.yaml",
                     "stable-avatar jobs requeue REQUEST_ID",
                     "stable-avatar jobs retarget OLD_FINGERPRINT NEW_FINGERPRINT --app stable-avatar"])
    commands = p.add_subparsers(dest="jobs_command", required=True, metavar="JOBS_COMMAND")

    dead = add_command(commands, "dead-letters", "list jobs that ran out of attempts, with their attempt history",
                       f"Jobs failed after job_attempts infrastructure faults, the latest first, each with every "
                       f"attempt (when, where, how it ended). {CONFIG_NOTE}",
                       ["stable-avatar jobs dead-letters", "stable-avatar jobs dead-letters --json --limit 100"])
    dead.add_argument("--limit", type=int, default=20, help="how many to list (default 20)")
    dead.add_argument("--json", action="store_true", help="print JSON (the jobs and their attempts) instead")

    requeue = add_command(commands, "requeue", "put a dead letter back in the queue",
                          "Queue a dead letter again in its old place with a fresh allowance of attempts; it resumes "
                          f"from its checkpoint (if retention has not deleted it) and its webhook is sent again when "
                          f"it finishes. {CONFIG_NOTE}",
                          ["stable-avatar jobs requeue REQUEST_ID",
                           "stable-avatar jobs requeue REQUEST_ID --fingerprint NEW_FINGERPRINT"])
    requeue.add_argument("request_id", metavar="REQUEST_ID", help="the dead letter's id")
    requeue.add_argument("--fingerprint", default=None,
                         help="run it on this model instead (it starts over there; default: its own)")

    retarget = add_command(commands, "retarget", "move the queued jobs of one model fingerprint onto another",
                           "Queued jobs wait for an application of the model they were submitted to. When that "
                           "application was removed before it drained its queue, move them onto the model that "
                           f"replaced it (they start over there). {CONFIG_NOTE}",
                           ["stable-avatar jobs retarget 0123abcd0123abcd 4567ef014567ef01"])
    retarget.add_argument("from_fingerprint", metavar="FROM", help="the removed application's model fingerprint")
    retarget.add_argument("to_fingerprint", metavar="TO", help="the fingerprint of the application to run them")

    for command in (dead, requeue, retarget):
        command.set_defaults(handler=run)
        command.add_argument("--config", type=Path, default=Path("serve_config.yaml"),
                             help="the Serve config whose application's jobs database to use")
        command.add_argument("--app", default=None,
                             help="the application in the config (default: its first)")


def open_store(config_path: Path, app_name: str | None) -> SyncJobStore:
    """The jobs database of ``app_name`` (default: the first application) in the Serve config at
    ``config_path`` (``ValueError`` naming what is wrong)."""
    from pydantic import TypeAdapter, ValidationError

    from deployments.jobstore import DEFAULT_SQLITE_NAME, JobsConfig, make_sync_job_store
    from stable_avatar.serve_command import load_config

    apps = load_config(config_path).get("applications") or []
    chosen = [app for app in apps if app_name is None or app.get("name") == app_name][:1]
    if not chosen:
        names = ", ".join(repr(app.get("name")) for app in apps) or "none"
        raise ValueError(f"--config {config_path}: no application {app_name!r} (it has {names})")
    args = chosen[0].get("args") or {}
    storage = args.get("storage") or {}
    if args.get("jobs") is None and storage.get("kind", "local") != "local":
        raise ValueError(f"--config {config_path}: the application has S3 storage and no jobs: block")
    try:
        jobs = TypeAdapter(JobsConfig).validate_python(args.get("jobs") or {"kind": "sqlite"})
    except ValidationError as exc:
        raise ValueError(f"--config {config_path}: jobs: {exc.errors()[0]['msg']}") from None
    return make_sync_job_store(jobs, Path(storage.get("root", "./data")) / DEFAULT_SQLITE_NAME)


def _when(epoch_s: float | None) -> str:
    return "-" if epoch_s is None else datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _dead_letters(store: SyncJobStore, args: argparse.Namespace) -> int:
    dead = store.dead_letters(args.limit)
    history = {job.request_id: store.attempts(job.request_id, job.owner) or [] for job in dead}
    if args.json:
        print(json.dumps([{"job": job.model_dump(mode="json"),
                           "attempts": [a.model_dump(mode="json") for a in history[job.request_id]]}
                          for job in dead], indent=2))
        return 0
    if not dead:
        print("no dead letters")
        return 0
    for job in dead:
        print(f"{job.request_id}  failed {_when(job.completed_at)}  key {job.owner or '-'}  model "
              f"{job.model_fingerprint or '-'}  checkpoint after step {job.checkpoint_step or 0}")
        print(f"    {job.error.message if job.error else 'no error recorded'}")
        for attempt in history[job.request_id]:
            print(f"    attempt {attempt.attempt} (epoch {attempt.epoch}) on {attempt.runner}: {_when(attempt.started_at)}"
                  f" .. {_when(attempt.ended_at)} {attempt.outcome or 'running'}"
                  + (f" ({attempt.error_class}: {attempt.error_message})" if attempt.error_class else ""))
    return 0


def _requeue(store: SyncJobStore, args: argparse.Namespace) -> int:
    from deployments.jobstore import NotDeadLetteredError

    try:
        job = store.requeue(args.request_id, model_fingerprint=args.fingerprint)
    except NotDeadLetteredError as exc:
        print_error(str(exc))
        return EXIT_FAILED
    resume = (f"it resumes after step {job.checkpoint_step}" if job.checkpoint_step and not args.fingerprint
              else "it starts over")
    print(f"re-queued {job.request_id} at position {store.position(job.request_id) or 0}; {resume}")
    return 0


def _retarget(store: SyncJobStore, args: argparse.Namespace) -> int:
    moved = store.retarget(args.from_fingerprint, args.to_fingerprint)
    print(f"moved {moved} queued jobs from model {args.from_fingerprint} to {args.to_fingerprint}")
    return 0


HANDLERS = {"dead-letters": _dead_letters, "requeue": _requeue, "retarget": _retarget}


def run(args: argparse.Namespace) -> int:
    try:
        store = open_store(args.config, args.app)
    except ValueError as exc:
        print_error(str(exc))
        return EXIT_BAD_INPUT
    try:
        return HANDLERS[args.jobs_command](store, args)
    except Exception as exc:  # noqa: BLE001 - the database away: one line, not a traceback
        print_error(f"the jobs database: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        store.close()
