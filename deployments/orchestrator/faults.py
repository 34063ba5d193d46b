"""Which faults a job survives: the classes of what can stop a run, and the answers they leave on the job.

*Infrastructure* faults are the service's, not the request's: the jobs database or the storage away for a while,
a replica that died (killed, preempted, out of memory, its node lost), a call that overran its timeout, a run that
stalled. The runner lets go of the job (``retry``) and it runs again from its checkpoint, on this replica or
another, after a backoff, up to ``job_attempts``. Everything else (a bad input, a pipeline error) fails the job at
once with its 4xx/5xx detail: running it again would fail again.

The message an infrastructure fault leaves on the job (its log, its attempt record and, once it ran out of
attempts, its answer) is shown to the tenant: it names the fault's class and the exception's type, never a
driver's or a storage backend's own text (hosts, buckets, paths); the server log has the traceback.
"""

from __future__ import annotations

import sqlite3

from ray.exceptions import (
    LocalRayletDiedError,
    NodeDiedError,
    ObjectLostError,
    ObjectStoreFullError,
    OutOfMemoryError,
    RayActorError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from deployments.jobstore import JobError
from deployments.runtime.errors import root_cause
from deployments.storage import StorageError, StorageNotFoundError, StorageTooLargeError
from guarded_fetch import InputError

# A replica (or the node, worker or object it held) is gone: the call may succeed anywhere else.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError,
                WorkerCrashedError, NodeDiedError, LocalRayletDiedError, ObjectLostError, OutOfMemoryError,
                ObjectStoreFullError)


class InfrastructureFault(Exception):
    """A fault this service raises itself; its message is written for the tenant (no internals)."""

    fault_class = "infrastructure"


class UnitTimeoutError(InfrastructureFault, TimeoutError):
    fault_class = "timeout"


class StageTimeoutError(InfrastructureFault, TimeoutError):
    fault_class = "timeout"


class RunStalledError(InfrastructureFault):
    fault_class = "stalled"


class StoreUnreachableError(InfrastructureFault):
    """The run's writes to the jobs database kept failing for longer than its lease."""

    fault_class = "database"


def _database_errors() -> tuple[type[BaseException], ...]:
    """The drivers' errors that mean the database is away (locked, restarting, failing over, the pool empty).
    Collected at import: importing psycopg takes seconds, never to be paid on an event loop mid-run."""
    errors: list[type[BaseException]] = [sqlite3.OperationalError, sqlite3.InterfaceError]
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency; SQLite alone still classifies
        return tuple(errors)
    return (*errors, psycopg.OperationalError, psycopg.InterfaceError)


DATABASE_ERRORS = _database_errors()


def is_database_fault(exc: BaseException) -> bool:
    return isinstance(root_cause(exc), DATABASE_ERRORS)


def fault_class(exc: BaseException) -> str | None:
    """The infrastructure fault ``exc`` is (``database``, ``storage``, ``replica``, ``timeout``, ``stalled``), or
    None when it is the request's own (an input or pipeline error: fail the job)."""
    cause = root_cause(exc)
    if isinstance(cause, InputError):
        return None
    if isinstance(cause, InfrastructureFault):
        return cause.fault_class
    if isinstance(cause, DATABASE_ERRORS):
        return "database"
    if isinstance(cause, StorageError) and not isinstance(cause, StorageNotFoundError | StorageTooLargeError):
        return "storage"
    if isinstance(exc, REPLICA_LOST) or isinstance(cause, REPLICA_LOST):
        return "replica"
    if isinstance(cause, TimeoutError):
        return "timeout"
    return None


def fault_message(fault: str, exc: BaseException) -> str:
    """One line for the tenant: the class and what happened, without a driver's or backend's own text."""
    cause = root_cause(exc)
    if isinstance(cause, InfrastructureFault):
        return str(cause)
    return f"{fault} fault ({type(cause).__name__})"


def infrastructure_error(fault: str, exc: BaseException) -> JobError:
    """The answer of a job whose attempt ended on an infrastructure fault (kept if it was its last attempt)."""
    message = fault_message(fault, exc)
    return JobError(status_code=504 if fault == "timeout" else 503, error_type="service_unavailable",
                    detail=f"the service could not run the job: {message}", message=message)


def job_deadline_error(job_s: float) -> JobError:
    """The answer of a job still unfinished ``timeouts.job_s`` after its first start."""
    message = f"the job did not finish within {job_s:g} s of its start (timeouts.job_s)"
    return JobError(status_code=504, detail=message, error_type="request_timeout", message=message,
                    timeout_type="server")
