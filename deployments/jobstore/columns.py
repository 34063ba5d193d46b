"""Rows to models: the column lists the queries select come from the models' fields, so they cannot drift apart.

A field is stored in the column of its name, except where :data:`FIELD_COLUMN` says otherwise. JSON columns are
decoded by the backend; ``priority`` is stored as its rank (the queue index orders by it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from deployments.jobstore.models import PRIORITY_NAME, AttemptRecord, ClaimedJob, JobView

M = TypeVar("M", bound=BaseModel)
FIELD_COLUMN = {"log_count": "log_seq"}
JSON_COLUMNS = frozenset({"input", "input_keys", "result", "result_keys", "error"})


def column_list(model: type[BaseModel]) -> str:
    return ", ".join(FIELD_COLUMN.get(field, field) for field in model.model_fields)


TEMPLATES = {"view_columns": column_list(JobView), "claim_columns": column_list(ClaimedJob),
             "attempt_columns": column_list(AttemptRecord)}


def to_model(model: type[M], row: dict[str, Any], json_out: Callable[[Any], Any], **overrides: Any) -> M:
    values = {}
    for field in model.model_fields:
        value = row[FIELD_COLUMN.get(field, field)]
        if field in JSON_COLUMNS:
            value = json_out(value)
        elif field == "priority":
            value = PRIORITY_NAME[int(value)]
        values[field] = value
    return model(**(values | overrides))


def job_view(row: dict[str, Any], json_out: Callable[[Any], Any]) -> JobView:
    # the column also reads TRUE when there was nothing to purge (a job without result objects)
    purged = bool(row["result_purged"]) and bool(json_out(row["result_keys"]))
    return to_model(JobView, row, json_out, result_purged=purged)


def claimed_job(row: dict[str, Any], json_out: Callable[[Any], Any]) -> ClaimedJob:
    return to_model(ClaimedJob, row, json_out)
