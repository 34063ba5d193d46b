"""What tests, benchmarks and examples share to run the service for real: throw-away PostgreSQL and SeaweedFS S3
servers, local Ray clusters with Serve's proxy, pytest fixtures over them, HTTP and media helpers.

Development only: runtime code never imports it (``tests/test_layering.py``) and the package build leaves it out.
It imports nothing from ``tests`` or ``bench``.

- :mod:`testing.postgres`, :mod:`testing.seaweedfs`: the servers (context managers);
- :mod:`testing.ray_serve`: the clusters (the one the Serve tests share, one of one's own, a multi-node one);
- :mod:`testing.fixtures`: the pytest fixtures over them (``postgres``, ``seaweedfs``, ``s3_env``,
  ``serve_cluster``);
- :mod:`testing.tiers`: the pytest markers that sort the suite by what a test needs;
- :mod:`testing.http`, :mod:`testing.media`: requests without raising on 4xx, free ports; example inputs,
  synthetic speech, ffprobe;
- :mod:`testing.sp_scenarios`: the sequence-parallel units the tests and ``bench/bench_sp.py`` run.
"""
