# Everything runs as root on a fresh Debian 12 / Ubuntu machine.
#   make run                      bootstrap, then serve on CORRAL_HOST:CORRAL_PORT (127.0.0.1:3000)
#   make test                     bootstrap, then the test suite
#   make test TESTS=tests/unit    narrow it; PYTEST_ARGS='-k name -x' to pass pytest options
#                                 (the whole suite runs the integration suites a second time on
#                                 gVisor; RUNSC_TESTS= skips that, RUNSC_TESTS=tests/x narrows it)
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

# The second pass runs the integration-level suites again with sandboxes on gVisor (runsc), on a
# test home, bridge and subnet of its own (tests/runsc_pass.py). Only for the whole suite, unless
# RUNSC_TESTS names what to run there; RUNSC_TESTS= (empty) skips it.
ifeq ($(TESTS),tests)
RUNSC_TESTS ?= tests/compat tests/integration tests/security tests/cli
endif

test: setup
	@bash scripts/generate.sh --check  # the committed protobuf/Connect code matches spec/envd (installs the generators once)
	$(VENV)/bin/python -m pytest $(TESTS) $(PYTEST_ARGS)
	@if [ -n "$(strip $(RUNSC_TESTS))" ]; then \
		echo "== the integration suites on gVisor: $$($(VENV)/bin/python -m tests.runsc_pass)"; \
		env $$($(VENV)/bin/python -m tests.runsc_pass) $(VENV)/bin/python -m pytest $(RUNSC_TESTS) $(PYTEST_ARGS); \
	fi

bench: setup
	@if ! command -v podman >/dev/null; then \
		echo "bench: installing podman from Debian (the peer the benchmarks compare with)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman >/dev/null; \
	fi
	$(VENV)/bin/python -m benchmarks $(BENCH_ARGS)

generate:
	bash scripts/generate.sh
