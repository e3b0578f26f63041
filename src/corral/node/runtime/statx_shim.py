"""The statx shim of gVisor sandboxes: coreutils 9 `stat`, `ls -l` and `ls -A` working under runsc.

Debian's runsc 20221219 refuses the flag AT_NO_AUTOMOUNT with EINVAL (in statx and newfstatat),
and coreutils 9 passes it to every statx. No runsc flag or OCI setting changes that, so runsc
sandboxes (`RuntimeTraits.statx_shim`) get `native/corral-statx.c`, a tiny glibc preload that makes
such a call again without the flag only when it failed with EINVAL (gVisor has no automounts, so
the answer is the one the flag asked for). How it reaches the sandbox:

- the shared object, built by scripts/bootstrap.sh next to the init binary on the host, is bound
  read-only at `SHIM_PATH` (`build_sandbox_config(statx_shim=...)`), like the init itself;
- `/etc/ld.so.preload` is a read-only bind of a per-sandbox file, rewritten at every boot, that
  names the shim first and then keeps every line of the template's own file (`preload_text`),
  read through the sandbox's confined root (`read_template_preload`: it is hostile input).

The sandbox's files only get the empty mount points the runtime makes (as for the init), so a
snapshot of a runsc sandbox boots on crun unchanged. glibc reads /etc/ld.so.preload for setuid
programs too; musl and static programs ignore it and keep gVisor's answer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from corral.core.errors import CorralError
from corral.node.envd.confined import ConfinedRoot

__all__ = [
    "LD_SO_PRELOAD",
    "MAX_PRELOAD_BYTES",
    "SHIM_FILE_NAME",
    "SHIM_PATH",
    "preload_text",
    "read_template_preload",
    "shim_binary",
]

log = logging.getLogger(__name__)

SHIM_FILE_NAME = "corral-statx.so"  # on the host, next to the init binary (scripts/bootstrap.sh)
SHIM_PATH = "/.corral/statx.so"  # in the sandbox, beside the init (`corral.node.runtime.oci.INIT_PATH`)
LD_SO_PRELOAD = "/etc/ld.so.preload"
MAX_PRELOAD_BYTES = 64 * 1024  # a template's own ld.so.preload names a few libraries


def shim_binary(init_binary: Path) -> Path | None:
    """The host's built shim (next to `init_binary`), or None (logged) when it is not there."""
    shim = init_binary.with_name(SHIM_FILE_NAME)
    if os.access(shim, os.R_OK):
        return shim
    log.warning(
        "no statx shim at %s (scripts/bootstrap.sh builds it): `ls -l` and `stat` fail under runsc", shim
    )
    return None


def preload_text(template_text: str) -> str:
    """The sandbox's /etc/ld.so.preload: the shim first, then the template's own file unchanged."""
    rest = template_text if not template_text or template_text.endswith("\n") else template_text + "\n"
    return f"{SHIM_PATH}\n{rest}"


def read_template_preload(rootfs: Path) -> str:
    """The text of /etc/ld.so.preload in `rootfs` ("" when absent), resolved as glibc inside would
    (symlinks stay in the rootfs). Anything but a regular file, or a file larger than
    `MAX_PRELOAD_BYTES` (which a template makes only to hurt), reads as ""."""
    with ConfinedRoot.open_path(str(rootfs)) as root:
        try:
            fd = root.open_regular(LD_SO_PRELOAD)
        except CorralError:  # absent, or not a regular file (glibc skips those too)
            return ""
        try:
            data = os.read(fd, MAX_PRELOAD_BYTES + 1)
        finally:
            os.close(fd)
    return "" if len(data) > MAX_PRELOAD_BYTES else data.decode("utf-8", "replace")
