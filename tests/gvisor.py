"""Marks for tests that meet a genuine difference of gVisor (`CORRAL_RUNTIME=runsc`, Debian's runsc
20221219), each naming the limitation; docs/security.md ("Runtimes") lists the same ones.

They are strict xfails under runsc (a test that starts passing there means gVisor was upgraded:
update the docs and drop the mark) and plain tests on every other runtime.
"""

from __future__ import annotations

import os

import pytest

__all__ = [
    "CGROUPFS",
    "FIFO",
    "GOFER_ATTRIB",
    "HOST_PTY",
    "NO_NS_LAST_PID",
    "NO_PING",
    "NO_SUDO",
    "RUNSC",
]

RUNSC = os.environ.get("CORRAL_RUNTIME", "crun") == "runsc"


def _limit(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(RUNSC, reason=f"gVisor (runsc 20221219): {reason}", strict=True)


NO_SUDO = _limit("no_new_privs is always set, so sudo cannot gain root")
CGROUPFS = _limit("no cgroup filesystem inside the sandbox (/sys/fs/cgroup/memory is absent)")
NO_NS_LAST_PID = _limit("its /proc has no sys/kernel/ns_last_pid")
HOST_PTY = _limit(
    "a terminal is a host pty passed through `runsc exec`: it has no /dev/pts name, and closing it "
    "does not hang up the jobs of its session"
)
GOFER_ATTRIB = _limit(
    "sandbox writes reach the disk through the gofer, which also sets times: watchers see extra chmod events"
)
NO_PING = _limit(
    "with --network=host the Sentry makes host TCP and UDP sockets only: no ICMP echo (ping) sockets"
)
FIFO = _limit("FIFOs made in the sandbox live in the Sentry only; envd's file API does not see them")
