"""``bench/bench_sp.py`` at tiny size on the CPU: every section runs and writes consistent fields, so the multi-GPU
timing section (the same code over NCCL) is ready for a node with several GPUs."""

from __future__ import annotations

import json

from bench.bench_sp import main


def test_every_section_runs_at_tiny_size(tmp_path):
    out, txt = tmp_path / "sp.json", tmp_path / "sp.txt"
    code = main(["--sections", "equality,volume,timing", "--preset", "tiny", "--degrees", "1,2",
                 "--warmup", "0", "--repeats", "1", "--json", str(out), "--txt", str(txt)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [(r["degree"], r["attention"]) for r in result["equality"]] == [(2, "ulysses"), (2, "ring")]
    assert all(r["within_tolerance"] and r["bytes_match_formula"] for r in result["equality"])
    assert [(r["degree"], r["attention"]) for r in result["volume"]] == [(2, "ulysses"), (2, "ring")]
    timing = {r["degree"]: r for r in result["timing"]}
    assert set(timing) == {1, 2} and timing[1]["speedup"] == 1.0
    assert timing[2]["attention"] == "ulysses" and timing[2]["max_abs_diff_vs_degree_1"] <= 1e-5
    assert timing[2]["bytes_sent_per_rank"]["ulysses_qkv"] > 0 and timing[1]["bytes_sent_per_rank"] == {}
    assert "equality with one device" in txt.read_text() and "timing: tiny" in txt.read_text()
