"""What the Ray clusters of the tests and benchmarks read from their environment, set before any starts.

A cluster's processes inherit the environment of the process that starts them (``ray.init``, ``ray start``, a
``serve run`` subprocess), so setting these in the test process covers the shared cluster, the clusters of a
module's own and the CLI's. Production clusters keep Ray's defaults: these trade reaction time a test never waits
on for CPU on a 2-core box, where the suite is CPU-bound (``bench/results/serve_costs.txt``).
"""

from __future__ import annotations

import os

TEST_CLUSTER_ENV: dict[str, str] = {
    # No token between the driver and the cluster: loopback only.
    "RAY_AUTH_MODE": "disabled",
    # Serve's controller reconciles 4 times a second instead of 10: an idle application's largest single cost.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.25",
    # Each replica and router records its metrics as they happen instead of waking 10 times a second to flush a
    # cache of them (Serve's switch for that cache); the tests that read metrics see them no later.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "0",
}


def use_test_cluster_env() -> None:
    """Set :data:`TEST_CLUSTER_ENV` where the environment does not already say otherwise."""
    for name, value in TEST_CLUSTER_ENV.items():
        os.environ.setdefault(name, value)
