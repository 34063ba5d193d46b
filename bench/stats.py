"""What every benchmark reports beside its timings: percentiles of samples and the machine's load average; and
where it writes them."""

from __future__ import annotations

import json
import os
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    """The sample at rank round(q% of n-1) of the sorted values (no interpolation: a value that was measured)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(seconds: list[float], digits: int = 2) -> dict[str, float]:
    """p50, p95 and max in milliseconds, and the sample count."""
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": round(percentile(ms, 50), digits), "p95_ms": round(percentile(ms, 95), digits),
            "max_ms": round(max(ms), digits), "n": len(ms)}


def load_average(digits: int = 2) -> list[float]:
    """The 1, 5 and 15 minute load averages: the machine is shared, so every section records them."""
    return [round(x, digits) for x in os.getloadavg()]


def write_results(out: Path, result: dict, table: str) -> None:
    """``out``.json (the result) and ``out``.txt (its table), the pair every benchmark leaves in bench/results/."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".txt").write_text(table + "\n")
