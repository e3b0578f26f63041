"""The node's sandboxes: create, destroy and re-adopt them (composition of runtime, storage, network).

A sandbox on disk: `sandboxes/<id>/` holds `config.json` (the OCI bundle), `upper/` + `work/` (its
private overlay layer), `rootfs/` (the overlay mount), `etc/` (hostname, hosts, resolv.conf bound
into it). Its network namespace and veth are named after the bridge and the id. Killing a sandbox
removes all of that; a server restart re-adopts what is still running and removes what is not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import resource
import shutil
from pathlib import Path
from typing import Any

from corral.core.errors import NotFound, Unavailable
from corral.core.sandbox import SandboxSpec
from corral.core.settings import Settings
from corral.node.envd.confined import ConfinedRoot
from corral.node.envd.context import EnvdSandbox
from corral.node.envd.process import ProcessTable
from corral.node.network import resolv_conf_text
from corral.node.runtime.crun import OciRuntime, RuntimeSpawner
from corral.node.runtime.oci import build_sandbox_config
from corral.node.storage.mounts import apply_mount, overlay_mount, unmount

__all__ = ["SandboxHandle", "Node"]

log = logging.getLogger(__name__)

INIT_BINARY_CANDIDATES = ("/usr/bin/catatonit", "/usr/libexec/podman/catatonit")


@dataclasses.dataclass(eq=False)
class SandboxHandle:
    spec: SandboxSpec
    path: Path
    init_pid: int
    root_fd: int
    ip: str
    envd: EnvdSandbox

    @property
    def sandbox_id(self) -> str:
        return self.spec.sandbox_id


def _init_binary() -> str:
    for candidate in INIT_BINARY_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise Unavailable("no init for sandboxes: install the 'catatonit' package")


def _etc_files(spec: SandboxSpec, settings: Settings) -> dict[str, str]:
    return {
        "hostname": f"{spec.sandbox_id}\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{spec.sandbox_id}\n",
        "resolv.conf": resolv_conf_text(settings),
    }


class Node:
    """All sandboxes of this host. One instance per server process."""

    def __init__(self, settings: Settings, runtime: OciRuntime, network: Any, templates: Any) -> None:
        self.settings = settings
        self.runtime = runtime
        self.network = network
        self.templates = templates
        self._sandboxes: dict[str, SandboxHandle] = {}
        self._nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self._init_binary = ""

    async def start(self) -> None:
        self._init_binary = _init_binary()
        for path in (self.settings.sandboxes_dir, self.settings.runtime_root):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.network.ensure_host()

    async def close(self) -> None:
        """Server stop: sandboxes keep running (re-adopted on the next start); only our handles close."""
        for handle in self._sandboxes.values():
            handle.envd.processes.close()
            handle.envd.root.close()
        self._sandboxes.clear()
        await self.network.close()

    def get(self, sandbox_id: str) -> SandboxHandle:
        handle = self._sandboxes.get(sandbox_id)
        if handle is None:
            raise NotFound(f"sandbox '{sandbox_id}' is not running on this node")
        return handle

    def __contains__(self, sandbox_id: str) -> bool:
        return sandbox_id in self._sandboxes

    def by_ip(self, ip: str) -> SandboxHandle | None:
        return next((h for h in self._sandboxes.values() if h.ip == ip), None)

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        path = self.settings.sandboxes_dir / spec.sandbox_id
        try:
            return await self._create(spec, path)
        except BaseException:
            await self._cleanup(spec.sandbox_id)
            raise

    async def _create(self, spec: SandboxSpec, path: Path) -> SandboxHandle:
        for sub in ("upper", "work", "rootfs", "etc"):
            (path / sub).mkdir(parents=True, exist_ok=False)
        attachment = await self.network.attach(spec.sandbox_id, allow_internet=spec.allow_internet_access)
        etc = {}
        for name, text in _etc_files(spec, self.settings).items():
            (path / "etc" / name).write_text(text)
            etc[f"/etc/{name}"] = str(path / "etc" / name)
        layers = [self.templates.layer_path(digest) for digest in spec.layers]
        apply_mount(overlay_mount(layers, path / "upper", path / "work", path / "rootfs"))
        config = build_sandbox_config(
            sandbox_id=spec.sandbox_id,
            rootfs=str(path / "rootfs"),
            netns_path=attachment.netns_path,
            init_binary=self._init_binary,
            etc_files=etc,
            cpu_count=spec.cpu_count,
            memory_mb=spec.memory_mb,
            pids_limit=spec.pids_limit,
            nofile_hard=self._nofile_hard,
            cgroups_path=f"/corral-{self.settings.bridge}/{spec.sandbox_id}",
        )
        (path / "config.json").write_text(json.dumps(config))
        init_pid = await self.runtime.run(spec.sandbox_id, path)
        return self._register(spec, path, init_pid, str(attachment.ip))

    def _register(self, spec: SandboxSpec, path: Path, init_pid: int, ip: str) -> SandboxHandle:
        # The sandbox's root as its init sees it (with its own mounts); held from now on so a
        # recycled pid can never redirect file access to another tree.
        root_fd = os.open(f"/proc/{init_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        envd = EnvdSandbox(
            sandbox_id=spec.sandbox_id,
            template_id=spec.template_id,
            access_token=spec.access_token,
            env_vars=dict(spec.env_vars),
            root=ConfinedRoot(root_fd, owns_fd=True),
            spawner=RuntimeSpawner(self.runtime, spec.sandbox_id, path, self._nofile_hard),
            processes=ProcessTable(),
        )
        handle = SandboxHandle(spec=spec, path=path, init_pid=init_pid, root_fd=root_fd, ip=ip, envd=envd)
        self._sandboxes[spec.sandbox_id] = handle
        return handle

    async def destroy(self, sandbox_id: str) -> None:
        """Remove everything of a sandbox: processes, mounts, cgroups, veth, address, rules. Idempotent."""
        handle = self._sandboxes.pop(sandbox_id, None)
        if handle is not None:
            handle.envd.processes.close()
        await self._cleanup(sandbox_id)
        if handle is not None:
            handle.envd.root.close()

    async def _cleanup(self, sandbox_id: str) -> None:
        path = self.settings.sandboxes_dir / sandbox_id
        await self.runtime.delete(sandbox_id)
        await asyncio.to_thread(unmount, path / "rootfs")
        await self.network.detach(sandbox_id)
        await asyncio.to_thread(shutil.rmtree, path, True)

    async def reconcile(self, specs: list[SandboxSpec]) -> tuple[list[str], list[str]]:
        """After a restart: adopt running sandboxes the database knows, remove everything else.

        Returns (adopted ids, lost ids): lost ones were in the database but their container is gone.
        """
        wanted = {spec.sandbox_id: spec for spec in specs}
        containers = {c["id"]: c for c in await self.runtime.list()}
        attachments = await self.network.list_attached()
        adopted: list[str] = []
        lost: list[str] = []
        for sandbox_id, spec in wanted.items():
            container = containers.get(sandbox_id)
            attachment = attachments.get(sandbox_id)
            if container and container.get("status") in ("running", "paused") and attachment is not None:
                try:
                    self._register(spec, self.settings.sandboxes_dir / sandbox_id, int(container["pid"]), str(attachment.ip))
                    adopted.append(sandbox_id)
                    continue
                except OSError as exc:
                    log.warning("cannot adopt sandbox %s: %s", sandbox_id, exc)
            lost.append(sandbox_id)
            await self._cleanup(sandbox_id)
        strays = (set(containers) | set(attachments) | self._sandbox_dirs()) - set(adopted)
        for sandbox_id in strays - set(lost):
            log.info("removing stray sandbox %s", sandbox_id)
            await self._cleanup(sandbox_id)
        await self.network.reconcile(set(adopted))  # also half-made namespaces list_attached() skips
        return adopted, lost

    def _sandbox_dirs(self) -> set[str]:
        root = self.settings.sandboxes_dir
        return {p.name for p in root.iterdir() if p.is_dir()} if root.exists() else set()
