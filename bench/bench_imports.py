"""What each deployment's module costs to import: the CPU seconds and memory a replica spends before its constructor.

A replica process imports its deployment's module (Ray unpickles the class by reference), so this is paid at every
replica start: autoscaling, a restart after a crash, an upgrade. Each module is imported in a fresh interpreter,
``--repeat`` times; reported: the median wall and CPU time, the peak RSS (``ru_maxrss``) and whether torch,
diffusers or transformers were loaded.

    python bench/bench_imports.py [--repeat 5] [--compare-rev REV]   # -> bench/results/imports.{json,txt}

``--compare-rev`` measures the same modules at another commit in the same run (a temporary git worktree), so a
change's effect is read side by side on the same machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.stats import load_average, write_results  # noqa: E402

MODULES = {
    "Gateway": "deployments.gateway.deployment",
    "Orchestrator": "deployments.orchestrator.deployment",
    "Preprocessor": "deployments.workers.preprocessor",
    "Denoiser": "deployments.workers.denoiser",
    "Postprocessor": "deployments.workers.postprocessor",
}
MODEL_LIBRARIES = ("torch", "diffusers", "transformers")
PROBE = """
import json, resource, sys, time
wall, cpu = time.perf_counter(), time.process_time()
import {module}
print(json.dumps({{"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "model_libraries": sorted(set({libraries}) & {{n.split(".")[0] for n in sys.modules}}),
                  "loaded": sorted(set({watched}) & set(sys.modules))}}))
"""


def measure(module: str, root: Path, watched: tuple[str, ...] = ()) -> dict:
    """Import ``module`` in a fresh interpreter: its cost, the model libraries it pulled in, and which of the
    ``watched`` modules it loaded."""
    code = PROBE.format(module=module, libraries=MODEL_LIBRARIES, watched=watched)
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """A temporary, detached git worktree of ``rev``."""
    with tempfile.TemporaryDirectory() as parent:
        path = Path(parent) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=REPO_ROOT, check=True,
                       capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO_ROOT, check=True,
                           capture_output=True)


def measure_all(root: Path, repeat: int) -> dict:
    rows = {}
    for deployment, module in MODULES.items():
        samples = [measure(module, root) for _ in range(repeat)]
        rows[deployment] = {
            "module": module,
            "wall_s": round(statistics.median(s["wall_s"] for s in samples), 2),
            "cpu_s": round(statistics.median(s["cpu_s"] for s in samples), 2),
            "max_rss_mib": round(statistics.median(s["max_rss_mib"] for s in samples), 1),
            "model_libraries": samples[-1]["model_libraries"],
        }
    return rows


def short_hash(rev: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def run(repeat: int, compare_rev: str | None) -> dict:
    result = {"repeat": repeat, "python": sys.version.split()[0],
              "commits": {short_hash("HEAD"): measure_all(REPO_ROOT, repeat)}}
    if compare_rev:
        with checkout(compare_rev) as root:
            result["commits"][f"{short_hash(compare_rev)} (compared)"] = measure_all(root, repeat)
    result["load_average"] = load_average()
    return result


def table(result: dict) -> str:
    lines = [f"import cost per replica start (median of {result['repeat']} fresh interpreters; "
             f"load average at the end {result['load_average']})"]
    for commit, rows in result["commits"].items():
        lines += ["", f"commit {commit}",
                  f"{'deployment':<14}{'module':<28}{'wall s':>8}{'CPU s':>8}{'peak RSS MiB':>14}  model libraries"]
        for deployment, row in rows.items():
            lines.append(f"{deployment:<14}{row['module']:<28}{row['wall_s']:>8.2f}{row['cpu_s']:>8.2f}"
                         f"{row['max_rss_mib']:>14.1f}  {', '.join(row['model_libraries']) or 'none'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compare-rev", help="also measure this commit, in a temporary worktree")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "imports")
    args = parser.parse_args()
    result = run(args.repeat, args.compare_rev)
    text = table(result)
    write_results(args.out, result, text)
    print(text)


if __name__ == "__main__":
    main()
