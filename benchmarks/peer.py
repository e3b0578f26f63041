"""The peer: podman (from Debian) running an image made from the same base rootfs as our `base`.

    peer = Podman.prepare(layer_dirs, digest)  # imports the image once per layer digest, checks it runs
    peer.run_true()                            # `podman run --rm <image> true`, default network
    with peer.running() as name: peer.exec_true(name)

The image is `corral-bench-base:<12 hex of the layers' digest>`: imported with
`tar -C <layer> -c . | podman import - <image>` and re-imported only when the digest changes (older
tags are removed then). With several layers, their read-only overlay is what gets imported.

rlimits: podman asks the runtime for nofile and nproc of 1048576 by default, and raising a hard
limit needs CAP_SYS_RESOURCE, which this machine's root lacks ("setrlimit `RLIMIT_NOFILE`:
Operation not permitted"); `--ulimit host` does not help. And podman lowers its own RLIMIT_NPROC to
32768 at start, so even the host's nproc is refused. A bench-only containers.conf (CONTAINERS_CONF)
sets `default_ulimits` to what podman can pass on: nofile = our hard limit, nproc = min(our hard
limit, 32768). `prepare` verifies it with one run and fails with podman's message otherwise.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["IMAGE", "PODMAN_NPROC_CAP", "Podman"]

IMAGE = "corral-bench-base"
PODMAN_NPROC_CAP = 32768  # podman sets its own RLIMIT_NPROC to this (seen in /proc/<podman>/limits)


def _run(argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload,no-any-return]


def containers_conf_text() -> str:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc = PODMAN_NPROC_CAP if nproc == resource.RLIM_INFINITY else min(nproc, PODMAN_NPROC_CAP)
    return (
        "# Written by Corral's `make bench`: podman's default rlimits exceed what this host allows.\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
    )


class Podman:
    def __init__(self, image: str, conf: Path) -> None:
        self.image = image
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    @classmethod
    def prepare(cls, layer_dirs: Sequence[Path], digest: str, state_dir: Path) -> Podman:
        """Import the image if needed, write the containers.conf, verify one `podman run`."""
        state_dir.mkdir(parents=True, exist_ok=True)
        conf = state_dir / "containers.conf"
        conf.write_text(containers_conf_text())
        peer = cls(f"{IMAGE}:{digest[:12]}", conf)
        if peer._podman("image", "exists", peer.image).returncode != 0:
            peer._import(layer_dirs)
        checked = peer._podman("run", "--rm", peer.image, "true")
        if checked.returncode != 0:
            raise RuntimeError(f"podman run fails on this host: {checked.stderr.strip()}")
        return peer

    def _podman(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return _run(["podman", *args], env=self.env, **kw)

    def _import(self, layer_dirs: Sequence[Path]) -> None:
        listed = self._podman("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference={IMAGE}")
        for old in listed.stdout.split():  # images of older base layers: ~800 MB each
            self._podman("rmi", "--force", old)
        with _merged(layer_dirs) as root:
            tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run(
                ["podman", "import", "-", self.image],
                stdin=tar.stdout, capture_output=True, text=True, env=self.env, check=False,
            )
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait() != 0 or imported.returncode != 0:
                raise RuntimeError(f"podman import failed: {imported.stderr.strip()}")

    # -- what is measured --------------------------------------------------------------------

    def run_true(self) -> float:
        """ms of `podman run --rm <image> true` (default network)."""
        started = time.perf_counter()
        result = self._podman("run", "--rm", self.image, "true")
        elapsed = (time.perf_counter() - started) * 1000
        if result.returncode != 0:
            raise RuntimeError(f"podman run failed: {result.stderr.strip()}")
        return elapsed

    def exec_true(self, name: str) -> float:
        started = time.perf_counter()
        result = self._podman("exec", name, "true")
        elapsed = (time.perf_counter() - started) * 1000
        if result.returncode != 0:
            raise RuntimeError(f"podman exec failed: {result.stderr.strip()}")
        return elapsed

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        """A detached container (`sleep infinity`) for `podman exec`; removed afterwards."""
        name = f"corral-bench-{uuid.uuid4().hex[:8]}"
        started = self._podman("run", "-d", "--name", name, self.image, "sleep", "infinity")
        if started.returncode != 0:
            raise RuntimeError(f"podman run -d failed: {started.stderr.strip()}")
        try:
            yield name
        finally:
            self._podman("rm", "--force", "--time", "0", name)


@contextlib.contextmanager
def _merged(layer_dirs: Sequence[Path]) -> Iterator[Path]:
    """The root to import: the layer itself, or a read-only overlay of several (lowest first)."""
    if len(layer_dirs) == 1:
        yield layer_dirs[0]
        return
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        lower = ":".join(str(d) for d in reversed(layer_dirs))  # overlayfs: leftmost is the top
        mounted = _run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", tmp])
        if mounted.returncode != 0:
            raise RuntimeError(f"cannot mount the template's layers: {mounted.stderr.strip()}")
        try:
            yield Path(tmp)
        finally:
            _run(["umount", tmp])
