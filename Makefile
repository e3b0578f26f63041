# Everything runs as root on a fresh Debian 12 / Ubuntu machine.
#   make run                      bootstrap, then serve on CORRAL_HOST:CORRAL_PORT (127.0.0.1:3000)
#   make test                     bootstrap, then the test suite
#   make test TESTS=tests/unit    narrow it; PYTEST_ARGS='-k name -x' to pass pytest options
#   make bench                    benchmarks against podman -> table + bench.json (benchmarks/README.md);
#                                 BENCH_ARGS='--only exec,files --runs 20' to narrow it

SHELL := /bin/bash
VENV := .venv
TESTS ?= tests
PYTEST_ARGS ?= -x -q
BENCH_ARGS ?=

.PHONY: setup run test bench generate

setup:
	@bash scripts/bootstrap.sh

run: setup
	exec $(VENV)/bin/corral server

test: setup
	$(VENV)/bin/python -m pytest $(TESTS) $(PYTEST_ARGS)

bench: setup
	@if ! command -v podman >/dev/null; then \
		echo "bench: installing podman from Debian (the peer the benchmarks compare with)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman >/dev/null; \
	fi
	$(VENV)/bin/python -m benchmarks $(BENCH_ARGS)

generate:
	bash scripts/generate.sh
