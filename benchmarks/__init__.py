"""Corral's benchmarks against podman (`make bench`; not part of `make test`). See README.md."""
