# stable-avatar-serve: `make demo` and `make test` do all set-up on a fresh machine.
# `make demo` needs only the project and ffmpeg; `make test` also the test tools, PostgreSQL, Chromium and npm packages.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled

.PHONY: setup setup-demo system-deps postgres-deps redis-deps browser-deps js-deps test test-fast demo lint bench bench-long bench-gpu \
	device-wheels device-check clean

# What the demo needs: the project in .venv and ffmpeg.
setup-demo: $(STAMP) system-deps

# Everything: the demo's set-up plus the test tools (pytest, ruff, the fal client, Playwright, SeaweedFS),
# PostgreSQL, Redis, Chromium and the JS client.
setup: setup-demo $(DEV_STAMP) postgres-deps redis-deps browser-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

# ffmpeg/ffprobe from Debian when missing (the pipeline also runs on imageio-ffmpeg's binary, but the tests probe
# outputs with ffprobe).
system-deps:
	@if ! command -v ffprobe >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; \
		else echo "please install ffmpeg (ffmpeg + ffprobe)"; exit 1; fi; \
	fi

# Debian's PostgreSQL server for the database tests: the fixture (testing/postgres.py) makes a throw-away cluster
# with /usr/lib/postgresql/<version>/bin/initdb and pg_ctl, which Debian does not put on PATH.
postgres-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
		else echo "please install the PostgreSQL server (Debian: apt-get install postgresql)"; exit 1; fi; \
	fi

# Debian's Redis server for tests/test_gcs_fault_tolerance.py: the fixture (tests/redis_server.py) starts a
# throw-away redis-server on 127.0.0.1 as the store of Ray's GCS fault tolerance, as KubeRay's external Redis is.
redis-deps:
	@if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
		else echo "please install the Redis server (Debian: apt-get install redis-server)"; exit 1; fi; \
	fi

# Debian's chromium for tests/test_playground.py (Playwright drives it; it never downloads a browser).
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else echo "please install chromium at /usr/bin/chromium (Debian: apt-get install chromium)"; exit 1; fi; \
	fi

# The official JS client (@fal-ai/client, pinned in tests/js/package-lock.json) for tests/test_fal_clients.py.
js-deps: tests/js/node_modules/.package-lock.json

tests/js/node_modules/.package-lock.json: tests/js/package-lock.json tests/js/package.json
	npm ci --prefix tests/js --no-audit --no-fund
	touch $@

# Every tier (unit, golden, database, serve, soak: testing/tiers.py); two workers take whole modules, the longest
# first. CI runs this.
test: setup js-deps
	$(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The developer loop: every test without Ray (unit, golden, database), modules spread over two workers.
test-fast: $(STAMP) system-deps postgres-deps
	$(BIN)/pytest -q -m "not serve" -n 2 --dist loadfile --no-loadscope-reorder

demo: setup-demo
	$(BIN)/python examples/run_demo.py

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/bench_inprocess.py
	$(BIN)/python bench/bench_fanout.py
	$(BIN)/python bench/bench_job_store.py
	$(BIN)/python bench/bench_wakeup.py
	$(BIN)/python bench/bench_jobs.py
	$(BIN)/python bench/bench_throughput.py
	$(BIN)/python bench/bench_retention.py
	$(BIN)/python bench/bench_step_cache.py
	$(BIN)/python bench/bench_split_rows.py
	$(BIN)/python bench/bench_imports.py --compare-rev ecb6b37  # the last commit whose Gateway imported torch
	$(BIN)/python bench/bench_serve_costs.py --compare-test-env

# 10 s, 60 s and 600 s of audio at 480x832 through the service (about an hour on 2 CPU cores); --quick: 10 s, 60 s.
bench-long: setup
	$(BIN)/python bench/bench_long_video.py

# Needs a CUDA GPU and this checkout's venv: StableAvatar 1.3B sizes (random weights), bf16, 480x832 ->
# bench/results/gpu.json. BENCH_GPU_ARGS="--steps 20" shortens it; on a lent device use bench/device/ (docs/gpu.md).
bench-gpu: setup
	$(BIN)/python bench/bench_gpu.py $(BENCH_GPU_ARGS)

# The device kit (docs/gpu.md): the wheels the GPU image lacks, into .whl/ (carried by a device call), and the kit
# run at tiny size on the CPU with the image's versions (Python 3.12, torch 2.11, transformers 5.17; ~5 GB venv).
device-wheels:
	bash bench/device/fetch_wheels.sh

device-check:
	bash bench/device/check.sh

clean:
	rm -rf $(VENV) demo.mp4 .pytest_cache .ruff_cache
