# Everything runs as root on a fresh Debian 12 / Ubuntu machine.
#   make run                      bootstrap, then serve on CORRAL_HOST:CORRAL_PORT (127.0.0.1:3000)
#   make test                     bootstrap, then the test suite
#   make test TESTS=tests/unit    narrow it; PYTEST_ARGS='-k name -x' to pass pytest options

SHELL := /bin/bash
VENV := .venv
TESTS ?= tests
PYTEST_ARGS ?= -x -q

.PHONY: setup run test bench generate

setup:
	@bash scripts/bootstrap.sh

run: setup
	exec $(VENV)/bin/corral server

test: setup
	$(VENV)/bin/python -m pytest $(TESTS) $(PYTEST_ARGS)

bench:
	@echo "benchmarks: not yet (see issue 7)"

generate:
	bash scripts/generate.sh
