"""The node's sandboxes: create, pause, resume, snapshot, destroy and re-adopt them (composition of
runtime, storage, network, cgroups).

A sandbox on disk, `sandboxes/<id>/`:
  config.json          the OCI bundle's config (rewritten at every boot)
  disk.img, disk/      its own sparse ext4 image, loop-mounted at disk/; holds upper/ and work/,
                       the private overlay layer, so `diskSizeMB` is a hard limit (ENOSPC inside)
  rootfs/              the overlay mount (template layers + disk/upper)
  etc/                 hostname, hosts, resolv.conf bound into it
  boot_id, cpuinfo, cpu_online   files bound over the kernel's (see `corral.node.runtime.oci`)
  idmap                its user namespace's host id range (`corral.node.runtime.idmap`), chosen at
                       creation; none: it runs without one (made with CORRAL_USERNS=0, or runsc)
(Sandboxes made before disk images existed have upper/ and work/ directly in the directory.)
Its network namespace and veth are named after the bridge and the id.

States of a sandbox on the node (`NodeStatus`):
  RUNNING --freeze--> FROZEN --thaw--> RUNNING      memory, processes and files kept (cgroup freezer,
                                                    written directly: see corral.node.cgroups.freezer)
  RUNNING|FROZEN --stop--> STOPPED --cold_start--> RUNNING
                       container gone, files and network kept; a cold boot gets a new boot id
  any --destroy--> gone (container, mounts, cgroups, netns, directory)
  any --retire--> not held any more at once; the rest of `destroy` runs in the background
  (POOLED) --serve--> RUNNING     booted ahead by the warm pool (`corral.node.pool`), unserved
                                  until a create claims it and brings its env vars and token
Only RUNNING sandboxes are served: `sandbox_id in node` is False for the others, so the proxy
answers 502 for them (the SDK reads that as "not running"). `wake()` lets the proxy ask the control
plane to resume a frozen sandbox on traffic (auto-resume); the control plane installs `waker`.

A server restart re-adopts running, frozen and stopped sandboxes the database knows and removes
everything else.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import json
import logging
import os
import resource
import shutil
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from corral.core.errors import CorralError, FailedPrecondition, NotFound, Unavailable
from corral.core.sandbox import SandboxSpec
from corral.core.settings import Settings
from corral.node.cgroups import (
    CgroupUsage,
    cpu_online_text,
    filter_cpuinfo,
    freeze,
    host_cpus,
    locate_cgroups,
    parse_cpuset,
    pick_cpus,
    read_usage,
    thaw,
)
from corral.node.envd.confined import ConfinedRoot
from corral.node.envd.context import EnvdSandbox
from corral.node.envd.process import ProcessTable
from corral.node.network import resolv_conf_text
from corral.node.network.in_netns import set_sysctls
from corral.node.runtime.agent import AGENT_SOCKET, AgentSpawner, listen_agent_socket
from corral.node.runtime.crun import OciRuntime, RuntimeSpawner
from corral.node.runtime.idmap import (
    LOW_PORTS_SYSCTLS,
    IdMap,
    idmapped_layers,
    pick_base,
    read_idmap,
    release_layers,
    write_idmap,
)
from corral.node.runtime.oci import BOOT_ID_PATH, CPU_ONLINE_PATH, CPUINFO_PATH, build_sandbox_config
from corral.node.runtime.runtimes import (
    TRAITS,
    RuntimeRecord,
    check_runtime,
    fill_cpuset_parents,
    read_runtime_record,
    runtime_name,
    state_root_for,
    unsafe_mount_targets,
    write_runtime_record,
)
from corral.node.runtime.statx_shim import LD_SO_PRELOAD, preload_text, read_template_preload, shim_binary
from corral.node.storage.commit import commit_layer
from corral.node.storage.disk import DiskPlan, create_disk, disk_plan, disk_usage, mount_disk
from corral.node.storage.mounts import Mount, apply_mount, is_mountpoint, overlay_mount, unmount

__all__ = ["Node", "NodeStatus", "SandboxHandle", "SandboxUsage"]

log = logging.getLogger(__name__)

INIT_BINARY_CANDIDATES = ("/usr/bin/catatonit", "/usr/libexec/podman/catatonit")
# Layers made from upper dirs must be plain: no redirects or metacopy-only files pointing into
# lower layers, whatever the host's overlay module defaults are.
_OVERLAY_EXTRA_OPTIONS = ("redirect_dir=off", "metacopy=off")

Waker = Callable[[str], Awaitable[bool]]


class NodeStatus(enum.StrEnum):
    RUNNING = "running"  # container running, served
    FROZEN = "frozen"  # container frozen by the cgroup freezer: memory kept, no CPU, not served
    STOPPED = "stopped"  # no container; files, disk and network kept for a cold boot
    POOLED = "pooled"  # booted ahead by the warm pool; not served until `serve` hands it out


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxUsage:
    """One reading of what a sandbox uses (for metrics)."""

    cgroup: CgroupUsage
    cpu_count: int
    disk_used: int
    disk_total: int


@dataclasses.dataclass(eq=False)
class SandboxHandle:
    spec: SandboxSpec
    path: Path
    init_pid: int  # 0 while stopped
    root_fd: int  # -1 while stopped
    ip: str
    envd: EnvdSandbox | None  # None while stopped
    netns_path: str = ""
    status: NodeStatus = NodeStatus.RUNNING
    cpus: tuple[int, ...] = ()
    runtime: OciRuntime | None = None  # the runtime that runs it (None: the node's default)
    id_map: IdMap | None = None  # its user namespace, chosen at creation (None: host ids = sandbox ids)

    @property
    def sandbox_id(self) -> str:
        return self.spec.sandbox_id

    @property
    def serving(self) -> bool:
        return self.status is NodeStatus.RUNNING


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    """Where a sandbox's parts are (pure)."""

    path: Path
    disk: DiskPlan | None  # None: a sandbox from before disk images (upper/ work/ in `path`)

    @classmethod
    def of(cls, path: Path, disk_size_mb: int) -> _Layout:
        if (path / "upper").is_dir() and not (path / "disk.img").exists():
            return cls(path, None)
        return cls(path, disk_plan(path, disk_size_mb) if disk_size_mb > 0 else None)

    @property
    def upper(self) -> Path:
        return self.disk.upper if self.disk is not None else self.path / "upper"

    @property
    def work(self) -> Path:
        return self.disk.work if self.disk is not None else self.path / "work"

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"


def _init_binary() -> str:
    for candidate in INIT_BINARY_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise Unavailable("no init for sandboxes: install the 'catatonit' package")


def _agent_binary(settings: Settings, default_runtime: OciRuntime) -> str:
    """The exec agent (native/corral-init.c) when enabled; "" when disabled, or missing while the
    default runtime does not need it (sandboxes then get catatonit and `<runtime> exec`)."""
    if not settings.exec_agent:
        return ""
    if os.access(settings.init_binary, os.X_OK):
        return str(settings.init_binary)
    if not default_runtime.traits.exec_agent:
        return ""
    raise Unavailable(
        f"no exec agent for sandboxes at {settings.init_binary}: build it with scripts/bootstrap.sh "
        "(make setup), point CORRAL_INIT_BINARY at it, or set CORRAL_EXEC_AGENT=0"
    )


def _listen_for_agent(socket_path: Path, agent: bool) -> socket.socket | None:
    """The exec agent's listening socket (None without an agent: then no socket file either, which
    is how `_attach_envd` tells, also after a restart, that a sandbox has no agent)."""
    if agent:
        return listen_agent_socket(socket_path)
    socket_path.unlink(missing_ok=True)
    return None


def _etc_files(spec: SandboxSpec, settings: Settings) -> dict[str, str]:
    return {
        "hostname": f"{spec.sandbox_id}\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{spec.sandbox_id}\n",
        "resolv.conf": resolv_conf_text(settings),
    }


def _read_host_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


class Node:
    """All sandboxes of this host. One instance per server process."""

    def __init__(self, settings: Settings, runtime: OciRuntime, network: Any, templates: Any) -> None:
        self.settings = settings
        self.runtime = runtime  # the server's default runtime
        # Every runtime this node has used, by (name, state root): the default, and those that
        # templates asked for (`runtime_named`) or that recorded sandboxes name.
        self._runtimes: dict[RuntimeRecord, OciRuntime] = {self._record_of(runtime): runtime}
        self._checked_runtimes: set[str] = {runtime.traits.name}  # passed `check_runtime` (cli/server)
        self.network = network
        self.templates = templates
        self._sandboxes: dict[str, SandboxHandle] = {}
        self._nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self._init_binary = ""
        self._agent_binary = ""  # "" = no exec agent (see `_agent_binary`)
        self._host_cpus = host_cpus()
        self._host_cpuinfo = ""
        self.waker: Waker | None = None  # installed by the control plane: resume on traffic
        self.local_envd: Any = None  # installed by the server: envd at localhost:49983 in each sandbox
        self._retiring: dict[str, tuple[SandboxHandle | None, asyncio.Task[None]]] = {}  # background teardowns
        self._creating: dict[str, SandboxSpec] = {}  # creates in progress (their layers are being mounted)
        self._id_maps: dict[str, IdMap] = {}  # user-namespace slots of the sandbox directories here

    @property
    def cgroup_parent(self) -> str:
        return f"corral-{self.settings.bridge}"

    async def start(self) -> None:
        self._init_binary = _init_binary()
        self._agent_binary = _agent_binary(self.settings, self.runtime)
        self._host_cpuinfo = _read_host_cpuinfo()
        for path in (self.settings.sandboxes_dir, self.settings.runtime_root):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        _make_home_private(self.settings.home, self.settings.sandboxes_dir)
        await self.network.ensure_host()

    async def close(self) -> None:
        """Server stop: sandboxes keep running (re-adopted on the next start); only our handles close.
        Teardowns of killed sandboxes are finished first (bounded; reconcile removes what is left)."""
        pending = [task for _, task in self._retiring.values()]
        if pending:
            await asyncio.wait(pending, timeout=30)
        for handle in self._sandboxes.values():
            self._close_envd(handle)
        if self.local_envd is not None:
            self.local_envd.close_all()
        self._sandboxes.clear()
        await self.network.close()

    # -- lookups ---------------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> SandboxHandle:
        """The handle of a sandbox this node serves (running); NotFound otherwise."""
        handle = self._sandboxes.get(sandbox_id)
        if handle is None or not handle.serving:
            raise NotFound(f"sandbox '{sandbox_id}' is not running on this node")
        return handle

    def lookup(self, sandbox_id: str) -> SandboxHandle | None:
        """The handle of any sandbox this node holds, running, frozen or stopped."""
        return self._sandboxes.get(sandbox_id)

    def __contains__(self, sandbox_id: str) -> bool:
        """True when the sandbox is served (running); frozen and stopped ones are not."""
        handle = self._sandboxes.get(sandbox_id)
        return handle is not None and handle.serving

    def running_ids(self) -> list[str]:
        return [h.sandbox_id for h in self._sandboxes.values() if h.serving]

    def by_ip(self, ip: str) -> SandboxHandle | None:
        return next((h for h in self._sandboxes.values() if h.ip == ip), None)

    # -- runtimes --------------------------------------------------------------------------------

    @staticmethod
    def _record_of(runtime: OciRuntime) -> RuntimeRecord:
        return RuntimeRecord(runtime.traits.name, runtime.state_root)

    def _runtime_at(self, record: RuntimeRecord) -> OciRuntime:
        """The runtime of a record (made on first use; the default's binary for the default)."""
        runtime = self._runtimes.get(record)
        if runtime is None:
            runtime = self._runtimes[record] = OciRuntime(record.name, record.state_root)
        return runtime

    async def runtime_named(self, name: str) -> OciRuntime:
        """The runtime a template names, checked like the default one is at server start
        (installed, no open escape advisory unless allowed). InvalidArgument for an unknown name,
        FailedPrecondition when it is missing or refused."""
        name = runtime_name(name)
        if name == self.runtime.traits.name:
            return self.runtime
        if name not in self._checked_runtimes:
            allow = self.settings.allow_vulnerable_runtime
            checked, warnings = await asyncio.to_thread(check_runtime, name, allow_vulnerable=allow)
            for warning in warnings:
                log.warning("runtime %s for templates: %s", checked.label, warning)
            self._checked_runtimes.add(name)
        root = state_root_for(self.settings.runtime_root, self.runtime.traits.name, name)
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self._runtime_at(RuntimeRecord(name, root))

    async def _runtime_for(self, spec: SandboxSpec) -> OciRuntime:
        """The spec's runtime, else its template's, else the default."""
        name = spec.runtime
        if not name:
            try:
                name = getattr(self.templates.get(spec.template_id), "runtime", None) or ""
            except CorralError:  # a deleted template (a fork of one of its sandboxes)
                name = ""
        return await self.runtime_named(name) if name else self.runtime

    def _recorded_runtime(self, sandbox_dir: Path) -> OciRuntime:
        """The runtime a sandbox's directory records; the default for sandboxes without a record."""
        record = read_runtime_record(sandbox_dir)
        return self.runtime if record is None else self._runtime_at(record)

    def runtime_of(self, sandbox_id: str) -> OciRuntime:
        """The runtime that runs (or ran) a sandbox."""
        handle = self._sandboxes.get(sandbox_id)
        if handle is not None:
            return self.runtime_of_handle(handle)
        return self._recorded_runtime(self.settings.sandboxes_dir / sandbox_id)

    def runtime_of_handle(self, handle: SandboxHandle) -> OciRuntime:
        return handle.runtime if handle.runtime is not None else self.runtime

    def _known_runtimes(self) -> list[OciRuntime]:
        """Runtimes whose containers may exist: the default, those recorded by sandbox
        directories, and those with a state root of their own (`runtime-<name>` beside it)."""
        for sandbox_id in self._sandbox_dirs():
            self._recorded_runtime(self.settings.sandboxes_dir / sandbox_id)
        default_root = self.settings.runtime_root
        for name in TRAITS:
            root = state_root_for(default_root, self.runtime.traits.name, name)
            if root != default_root and root.is_dir():
                self._runtime_at(RuntimeRecord(name, root))
        return list(self._runtimes.values())

    async def wake(self, sandbox_id: str) -> bool:
        """Traffic reached a sandbox this node does not serve: ask the control plane to resume it
        (it does so only for frozen sandboxes with auto-resume). True when it is served now."""
        handle = self._sandboxes.get(sandbox_id)
        if handle is None or handle.status is not NodeStatus.FROZEN or self.waker is None:
            return False
        try:
            await self.waker(sandbox_id)
        except Exception:  # the request then gets the 502 of a paused sandbox
            log.exception("auto-resume of sandbox %s failed", sandbox_id)
        return sandbox_id in self

    # -- create and boot -------------------------------------------------------------------------

    async def create(self, spec: SandboxSpec, *, pooled: bool = False) -> SandboxHandle:
        """Boot a new sandbox. `pooled`: for the warm pool, held but not served until `serve`."""
        path = self.settings.sandboxes_dir / spec.sandbox_id
        self._creating[spec.sandbox_id] = spec
        try:
            return await self._create(spec, path, pooled)
        except BaseException:
            await self._cleanup(spec.sandbox_id)
            raise
        finally:
            self._creating.pop(spec.sandbox_id, None)

    async def _create(self, spec: SandboxSpec, path: Path, pooled: bool) -> SandboxHandle:
        # File system work runs in threads: under many creates at once the host file system's
        # journal makes a mkdir or a small write wait for ms, which would stall every request.
        runtime = await self._runtime_for(spec)
        await asyncio.to_thread(_make_dirs, path, ("rootfs", "etc"))
        await asyncio.to_thread(write_runtime_record, path, self._record_of(runtime))
        id_map = None
        if self.settings.userns and runtime.traits.user_namespace:  # sandbox root is not host root
            id_map = self._new_id_map(spec.sandbox_id)
            await asyncio.to_thread(write_idmap, path, id_map)
        golden_dir = self.settings.home / "disk-images"  # fresh images are copied from here (storage.disk)
        layout = _Layout(path, disk_plan(path, spec.disk_size_mb, golden_dir) if spec.disk_size_mb > 0 else None)
        # The disk (mkfs) and the network (ip, bridge, nft) are independent: made side by side.
        try:
            async with asyncio.TaskGroup() as group:
                if layout.disk is not None:
                    group.create_task(create_disk(layout.disk))
                attaching = group.create_task(
                    self.network.attach(spec.sandbox_id, allow_internet=spec.allow_internet_access)
                )
        except BaseExceptionGroup as failed:  # callers expect the error itself (a CorralError)
            raise failed.exceptions[0] from None
        attachment = attaching.result()
        etc = _etc_files(spec, self.settings)
        await asyncio.to_thread(_write_files, {path / "etc" / name: text for name, text in etc.items()})
        handle = SandboxHandle(
            spec=spec,
            path=path,
            init_pid=0,
            root_fd=-1,
            ip=str(attachment.ip),
            envd=None,
            netns_path=attachment.netns_path,
            status=NodeStatus.STOPPED,
            runtime=runtime,
            id_map=id_map,
        )
        await self._boot(handle, layout)
        if pooled:
            handle.status = NodeStatus.POOLED
        self._sandboxes[spec.sandbox_id] = handle
        return handle

    def is_pooled(self, sandbox_id: str) -> bool:
        handle = self._sandboxes.get(sandbox_id)
        return handle is not None and handle.status is NodeStatus.POOLED

    def serve(self, spec: SandboxSpec) -> SandboxHandle:
        """Hand out a pooled sandbox (same id as `spec`): the request's env vars and access token
        take effect, and from now on it is served like any created sandbox."""
        handle = self._held(spec.sandbox_id)
        if handle.status is not NodeStatus.POOLED or handle.envd is None:
            raise FailedPrecondition(f"sandbox '{spec.sandbox_id}' is not a pooled sandbox")
        handle.spec = spec
        handle.envd.env_vars = dict(spec.env_vars)
        handle.envd.access_token = spec.access_token
        handle.status = NodeStatus.RUNNING
        return handle

    def _cpu_load(self, exclude: str) -> collections.Counter[int]:
        load: collections.Counter[int] = collections.Counter()
        for handle in self._sandboxes.values():
            if handle.sandbox_id != exclude and handle.status is not NodeStatus.STOPPED:
                load.update(handle.cpus)
        return load

    async def _boot(self, handle: SandboxHandle, layout: _Layout) -> None:
        """Start the sandbox's container from its files: mounts, a new boot id, config, `crun run`."""
        spec, path = handle.spec, handle.path
        if layout.disk is not None:
            await mount_disk(layout.disk)
        else:
            for sub in (layout.upper, layout.work):
                sub.mkdir(exist_ok=True)
        layers = [self.templates.layer_path(digest) for digest in spec.layers]
        id_map = handle.id_map  # kept for the sandbox's life: its files hold these host ids
        if id_map is not None:  # sandbox root is not host root
            done = await asyncio.gather(  # independent: both finish before a failure is raised
                asyncio.to_thread(_mount_idmapped_overlay, layers, layout, path, id_map),
                set_sysctls(handle.netns_path, LOW_PORTS_SYSCTLS),
                return_exceptions=True,
            )
            for outcome in done:
                if isinstance(outcome, BaseException):
                    raise outcome
        else:
            mount = overlay_mount(layers, layout.upper, layout.work, layout.rootfs)
            await asyncio.to_thread(
                _mount_once, Mount(mount.fstype, mount.source, mount.target, mount.options + _OVERLAY_EXTRA_OPTIONS)
            )
        cpus = pick_cpus(self._host_cpus, self._cpu_load(spec.sandbox_id), spec.cpu_count)
        virtual = {
            BOOT_ID_PATH: (path / "boot_id", f"{uuid.uuid4()}\n"),
            CPUINFO_PATH: (path / "cpuinfo", filter_cpuinfo(self._host_cpuinfo, cpus)),
            CPU_ONLINE_PATH: (path / "cpu_online", cpu_online_text(len(cpus))),
        }
        files = {file: text for file, text in virtual.values()}
        agent = bool(self._agent_binary) and self.runtime_of_handle(handle).traits.exec_agent
        etc_files = {f"/etc/{name}": str(path / "etc" / name) for name in ("hostname", "hosts", "resolv.conf")}
        shim = shim_binary(self.settings.init_binary) if self.runtime_of_handle(handle).traits.statx_shim else None
        if shim is not None:  # runsc refuses AT_NO_AUTOMOUNT: see corral.node.runtime.statx_shim
            files[path / "etc" / "ld.so.preload"] = preload_text(
                await asyncio.to_thread(read_template_preload, layout.rootfs)
            )
            etc_files[LD_SO_PRELOAD] = str(path / "etc" / "ld.so.preload")
        config = build_sandbox_config(
            sandbox_id=spec.sandbox_id,
            rootfs=str(layout.rootfs),
            netns_path=handle.netns_path,
            init_binary=self._agent_binary if agent else self._init_binary,
            etc_files=etc_files,
            cpu_count=spec.cpu_count,
            memory_mb=spec.memory_mb,
            pids_limit=spec.pids_limit,
            nofile_hard=self._nofile_hard,
            cgroups_path=f"/{self.cgroup_parent}/{spec.sandbox_id}",
            cpus=cpus,
            virtual_files={dest: str(file) for dest, (file, _) in virtual.items()},
            id_map=id_map,
            exec_agent=agent,
            statx_shim=str(shim) if shim is not None else None,
        )
        _refuse_unsafe_rootfs(spec.sandbox_id, layout.rootfs)
        runtime = self.runtime_of_handle(handle)
        if not runtime.traits.fills_cpuset_parents:  # runsc
            await asyncio.to_thread(fill_cpuset_parents, config["linux"]["cgroupsPath"])
        if runtime.traits.bind_tmp:  # runsc: its own tmpfs on /tmp would hide /tmp from envd
            (layout.rootfs / "tmp").mkdir(mode=0o1777, exist_ok=True)
            config["mounts"].append(
                {"destination": "/tmp", "type": "bind", "source": str(layout.rootfs / "tmp"), "options": ["rbind", "rw", "nosuid", "nodev"]}
            )
        files[path / "config.json"] = json.dumps(config)
        await asyncio.to_thread(_write_files, files)
        listener = await asyncio.to_thread(_listen_for_agent, path / AGENT_SOCKET, agent)
        try:
            init_pid = await runtime.run(spec.sandbox_id, path, listener.fileno() if listener else None)
        finally:
            if listener is not None:
                listener.close()  # the agent holds it now
        self._attach_envd(handle, init_pid)
        handle.cpus = cpus
        handle.status = NodeStatus.RUNNING

    def _new_id_map(self, sandbox_id: str) -> IdMap:
        """A new sandbox's own host id range: the lowest slot no sandbox directory of this node
        holds (`_id_maps`, kept in memory: no file reads per create). No await between looking
        and taking, so concurrent creates cannot pick the same."""
        id_map = IdMap(pick_base(m.base for m in self._id_maps.values()))
        self._id_maps[sandbox_id] = id_map
        return id_map

    def _attach_envd(self, handle: SandboxHandle, init_pid: int) -> None:
        # The sandbox's root as its init sees it (with its own mounts); held from now on so a
        # recycled pid can never redirect file access to another tree.
        spec = handle.spec
        root_path = f"/proc/{init_pid}/root"
        runtime = self.runtime_of_handle(handle)
        if not runtime.traits.files_from_init_root:  # runsc: its sandbox process sees an empty dir
            root_path = str(handle.path / "rootfs")
        root_fd = os.open(root_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        handle.init_pid = init_pid
        handle.root_fd = root_fd
        processes = ProcessTable()
        handle.envd = EnvdSandbox(
            sandbox_id=spec.sandbox_id,
            template_id=spec.template_id,
            access_token=spec.access_token,
            env_vars=dict(spec.env_vars),
            root=ConfinedRoot(root_fd, owns_fd=True, id_map=handle.id_map),
            spawner=(
                # Processes a previous server started come back with each new agent connection.
                AgentSpawner(handle.path / AGENT_SOCKET, spec.sandbox_id, on_adopted=processes.adopt_all)
                if (handle.path / AGENT_SOCKET).exists()  # booted with the exec agent as its init
                else RuntimeSpawner(runtime, spec.sandbox_id, handle.path, self._nofile_hard)
            ),
            processes=processes,
            usage=lambda: self.usage(spec.sandbox_id),
            **self._template_defaults(spec.template_id),
        )
        if self.local_envd is not None:
            self.local_envd.open(spec.sandbox_id, f"/proc/{init_pid}/ns/net")

    def _template_defaults(self, template_id: str) -> dict[str, Any]:
        """The template's default user and workdir, which envd applies to requests that name none."""
        try:
            template = self.templates.get(template_id)
        except CorralError:  # a deleted template: its sandboxes keep E2B's defaults
            return {}
        return {"default_user": template.default_user, "default_workdir": template.default_workdir}

    @staticmethod
    def _close_envd(handle: SandboxHandle) -> None:
        root = Node._detach_envd(handle)
        if root is not None:
            root.close()

    @staticmethod
    def _detach_envd(handle: SandboxHandle) -> ConfinedRoot | None:
        """Close the envd side of a sandbox but its root fd, which is returned for the caller to close."""
        envd, handle.envd, handle.root_fd = handle.envd, None, -1
        if envd is None:
            return None
        envd.processes.close()
        envd.watchers.close()
        if isinstance(envd.spawner, AgentSpawner):
            envd.spawner.close()
        return envd.root

    # -- pause and resume ------------------------------------------------------------------------

    def _held(self, sandbox_id: str) -> SandboxHandle:
        handle = self._sandboxes.get(sandbox_id)
        if handle is None:
            raise NotFound(f"sandbox '{sandbox_id}' is not on this node")
        return handle

    async def freeze(self, sandbox_id: str) -> None:
        """Freeze a running sandbox (cgroup freezer): processes and memory stay, CPU use stops."""
        handle = self._held(sandbox_id)
        if handle.status is NodeStatus.FROZEN:
            return
        if handle.status is not NodeStatus.RUNNING:
            raise FailedPrecondition(f"sandbox '{sandbox_id}' is {handle.status.value}, not running")
        handle.status = NodeStatus.FROZEN  # stop serving before the processes stop
        try:
            await self._freeze_container(handle)
        except BaseException:
            handle.status = NodeStatus.RUNNING
            raise

    async def thaw(self, sandbox_id: str) -> None:
        handle = self._held(sandbox_id)
        if handle.status is NodeStatus.RUNNING:
            return
        if handle.status is not NodeStatus.FROZEN:
            raise FailedPrecondition(f"sandbox '{sandbox_id}' is {handle.status.value}, not frozen")
        await self._thaw_container(handle)
        handle.status = NodeStatus.RUNNING
        await self._take_over_processes([sandbox_id], timeout=2.0)  # if adopted while frozen

    async def _freeze_container(self, handle: SandboxHandle) -> None:
        runtime = self.runtime_of_handle(handle)
        if runtime.traits.pauses_itself:  # runsc: a frozen Sentry would hang every runsc command
            await runtime.pause(handle.sandbox_id)
        else:
            await freeze(locate_cgroups(self.cgroup_parent, handle.sandbox_id))

    async def _thaw_container(self, handle: SandboxHandle) -> None:
        runtime = self.runtime_of_handle(handle)
        if runtime.traits.pauses_itself:
            await runtime.resume(handle.sandbox_id)
        else:
            await thaw(locate_cgroups(self.cgroup_parent, handle.sandbox_id))

    async def stop(self, sandbox_id: str) -> None:
        """Stop the container but keep files, disk and network: the next start is a cold boot."""
        handle = self._held(sandbox_id)
        if handle.status is NodeStatus.STOPPED:
            return
        handle.status = NodeStatus.STOPPED
        self._close_envd(handle)  # cuts envd streams: their processes are about to die
        await self.runtime_of_handle(handle).delete(sandbox_id)
        handle.init_pid = 0
        await asyncio.to_thread(unmount, handle.path / "rootfs")

    async def cold_start(self, sandbox_id: str) -> None:
        """Boot a stopped sandbox again from its files (new processes, new boot id)."""
        handle = self._held(sandbox_id)
        if handle.status is not NodeStatus.STOPPED:
            raise FailedPrecondition(f"sandbox '{sandbox_id}' is {handle.status.value}, not stopped")
        # A leftover container record would block `run`.
        await self.runtime_of_handle(handle).delete(sandbox_id)
        await self._boot(handle, _Layout.of(handle.path, handle.spec.disk_size_mb))

    async def commit_upper(self, sandbox_id: str, pin: Callable[[str], None] | None = None) -> str:
        """Copy the sandbox's writable layer into a new read-only layer; returns its digest.

        The sandbox must not run (freeze or stop it first), so its files hold still while copied.
        `pin(digest)` runs just before the layer is published (see `commit_layer`).
        """
        handle = self._held(sandbox_id)
        if handle.status is NodeStatus.RUNNING:
            raise FailedPrecondition(f"sandbox '{sandbox_id}' must be frozen or stopped to copy its files")
        layout = _Layout.of(handle.path, handle.spec.disk_size_mb)
        if layout.disk is not None:
            await mount_disk(layout.disk)
        return await commit_layer(layout.upper, self.settings.layers_dir, handle.id_map, pin)

    # -- usage -----------------------------------------------------------------------------------

    def usage(self, sandbox_id: str) -> SandboxUsage:
        """What a running sandbox uses now. OSError when its cgroup is gone."""
        handle = self._held(sandbox_id)
        reading = read_usage(locate_cgroups(self.cgroup_parent, sandbox_id))
        layout = _Layout.of(handle.path, handle.spec.disk_size_mb)
        if layout.disk is not None and _is_other_device(layout.disk.mountpoint):
            used, total = disk_usage(layout.disk.mountpoint)
        else:
            used, total = 0, handle.spec.disk_size_mb * 1024 * 1024
        return SandboxUsage(cgroup=reading, cpu_count=len(handle.cpus) or handle.spec.cpu_count, disk_used=used, disk_total=total)

    # -- destroy and reconcile -------------------------------------------------------------------

    def retire(self, sandbox_id: str) -> asyncio.Task[None]:
        """`destroy`, with the waiting moved off the caller's path: the sandbox is no longer held or
        served from now on (its envd streams are cut, its localhost envd closed), and the removal
        of its processes and resources runs in a task the node owns (`close` waits for it; after a
        crash, reconcile removes what is left). Returns that task."""
        if sandbox_id in self._retiring:
            return self._retiring[sandbox_id][1]
        handle = self._sandboxes.pop(sandbox_id, None)
        if handle is not None and handle.envd is not None:
            handle.envd.processes.close()
        if self.local_envd is not None:
            self.local_envd.close(sandbox_id)

        async def teardown() -> None:
            try:
                await self._cleanup(sandbox_id)
            except Exception:
                log.exception("teardown of sandbox %s failed (reconcile will retry)", sandbox_id)
            finally:
                if handle is not None:
                    await self._close_envd_after_exit(handle)
                self._retiring.pop(sandbox_id, None)

        task = asyncio.get_running_loop().create_task(teardown(), name=f"teardown-{sandbox_id}")
        self._retiring[sandbox_id] = (handle, task)
        return task

    def layers_in_use(self) -> set[str]:
        """Layer digests of every sandbox the node holds, is creating or is still tearing down."""
        held = [*self._sandboxes.values(), *(h for h, _ in self._retiring.values() if h is not None)]
        specs = [handle.spec for handle in held] + list(self._creating.values())
        return {digest for spec in specs for digest in spec.layers}

    async def destroy(self, sandbox_id: str) -> None:
        """Remove everything of a sandbox: processes, mounts, disk, cgroups, veth, address, rules. Idempotent."""
        retiring = self._retiring.get(sandbox_id)
        if retiring is not None:
            await asyncio.shield(retiring[1])
        handle = self._sandboxes.pop(sandbox_id, None)
        if handle is not None and handle.envd is not None:
            handle.envd.processes.close()
        if self.local_envd is not None:
            self.local_envd.close(sandbox_id)
        await self._cleanup(sandbox_id)
        if handle is not None:
            await self._close_envd_after_exit(handle)

    async def _close_envd_after_exit(self, handle: SandboxHandle) -> None:
        """`_close_envd` once the container is gone. Its root fd is then the last hold on the
        container's mount namespace, and closing it tears that down, waiting for an RCU grace
        period (~10 ms here): done in a thread, not on the event loop."""
        root = self._detach_envd(handle)
        if root is not None:
            await asyncio.to_thread(root.close)

    async def _cleanup(self, sandbox_id: str, runtime: OciRuntime | None = None) -> None:
        path = self.settings.sandboxes_dir / sandbox_id
        await (runtime or self.runtime_of(sandbox_id)).delete(sandbox_id)
        await asyncio.to_thread(unmount, path / "rootfs")
        await asyncio.to_thread(unmount, path / "disk")
        await self.network.detach(sandbox_id)
        await asyncio.to_thread(shutil.rmtree, path, True)
        self._id_maps.pop(sandbox_id, None)  # its files are gone: the slot is free again

    async def reconcile(
        self, specs: list[SandboxSpec], paused: Mapping[str, bool] | None = None
    ) -> tuple[list[str], list[str]]:
        """After a restart: adopt the sandboxes the database knows, remove everything else.

        `paused` maps paused sandboxes to whether their memory is kept (frozen) or not (stopped);
        the others should run. Each adopted sandbox is brought to that state. Returns (adopted ids,
        lost ids): lost ones were in the database but their container (or files) are gone.
        """
        paused = dict(paused or {})
        wanted = {spec.sandbox_id: spec for spec in specs}
        containers: dict[str, dict[str, Any]] = {}
        listed_by: dict[str, OciRuntime] = {}  # which runtime has each container
        for runtime in self._known_runtimes():
            for container in await runtime.list():
                containers[container["id"]] = container
                listed_by[container["id"]] = runtime
        attachments = await self.network.list_attached()
        adopted: list[str] = []
        lost: list[str] = []
        for sandbox_id, spec in wanted.items():
            try:
                if await self._adopt(spec, containers.get(sandbox_id), attachments.get(sandbox_id), paused.get(sandbox_id)):
                    adopted.append(sandbox_id)
                    continue
            except Exception as exc:  # noqa: BLE001 - one sandbox that cannot be adopted is lost, not the start
                log.warning("cannot adopt sandbox %s: %s", sandbox_id, exc)
                self._sandboxes.pop(sandbox_id, None)
            lost.append(sandbox_id)
            await self._cleanup(sandbox_id)
        await self._take_over_processes(adopted)
        strays = (set(containers) | set(attachments) | self._sandbox_dirs()) - set(adopted)
        for sandbox_id in strays - set(lost):
            log.info("removing stray sandbox %s", sandbox_id)
            await self._cleanup(sandbox_id, listed_by.get(sandbox_id))
        await self.network.reconcile(set(adopted))  # also half-made namespaces list_attached() skips
        return adopted, lost

    async def _adopt(
        self, spec: SandboxSpec, container: dict[str, Any] | None, attachment: Any, keep_memory: bool | None
    ) -> bool:
        path = self.settings.sandboxes_dir / spec.sandbox_id
        if attachment is None or not (path / "config.json").is_file():
            return False
        handle = SandboxHandle(
            spec=spec,
            path=path,
            init_pid=0,
            root_fd=-1,
            ip=str(attachment.ip),
            envd=None,
            netns_path=attachment.netns_path,
            status=NodeStatus.STOPPED,
            cpus=_config_cpus(path),
            runtime=self._recorded_runtime(path),
            id_map=read_idmap(path),
        )
        if handle.id_map is not None:
            self._id_maps[spec.sandbox_id] = handle.id_map
        if keep_memory is False:  # stopped: no container should exist
            if container is not None:
                await self.runtime_of_handle(handle).delete(spec.sandbox_id)
            await asyncio.to_thread(unmount, path / "rootfs")
            self._sandboxes[spec.sandbox_id] = handle
            return True
        if container is None or container.get("status") not in ("running", "paused"):
            return False
        self._attach_envd(handle, int(container["pid"]))
        self._sandboxes[spec.sandbox_id] = handle
        if keep_memory:
            handle.status = NodeStatus.FROZEN
            if container["status"] != "paused":
                await self._freeze_container(handle)
        else:
            if container["status"] == "paused":
                await self._thaw_container(handle)
            handle.status = NodeStatus.RUNNING
        return True

    async def _take_over_processes(self, sandbox_ids: list[str], timeout: float = 5.0) -> None:
        """Connect to the exec agents of running sandboxes now, so that their processes (started by
        the previous server) are listed from the first request on; together, and bounded: an agent
        that does not answer in time hands them over at its next connection instead."""
        waits = []
        for sandbox_id in sandbox_ids:
            handle = self._sandboxes.get(sandbox_id)
            envd = handle.envd if handle is not None and handle.serving else None
            if envd is not None and isinstance(envd.spawner, AgentSpawner):
                waits.append(asyncio.ensure_future(envd.spawner.ready()))
        if waits:
            _, late = await asyncio.wait(waits, timeout=timeout)
            for wait in late:
                wait.cancel()

    def _sandbox_dirs(self) -> set[str]:
        root = self.settings.sandboxes_dir
        return {p.name for p in root.iterdir() if p.is_dir()} if root.exists() else set()


def _is_other_device(path: Path) -> bool:
    """Whether a file system is mounted at `path` (the sandbox disk's ext4: another device than
    its parent's). Two stats, where `is_mountpoint` parses all of /proc/self/mountinfo, which
    grows with every sandbox, on every metrics sample."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except OSError:
        return False


def _make_dirs(path: Path, subs: tuple[str, ...]) -> None:
    for sub in subs:
        (path / sub).mkdir(parents=True, exist_ok=False)


def _make_home_private(home: Path, sandboxes_dir: Path) -> None:
    """Only host root reads the home: a process that escaped a sandbox runs as an unprivileged
    host uid (user namespaces) and must not read other sandboxes' layers, templates (their build
    env vars), build logs or the database. The home stays searchable (0711) because the runtime
    reaches a rootfs under `sandboxes_dir` from inside the user namespace; everything else in it
    is 0700 / 0600."""
    os.chmod(home, 0o711)
    for entry in home.iterdir():
        if entry == sandboxes_dir or entry.is_symlink():
            continue
        os.chmod(entry, 0o700 if entry.is_dir() else 0o600)


def _write_files(files: Mapping[Path, str]) -> None:
    for file, text in files.items():
        file.write_text(text)


def _mount_idmapped_overlay(layers: list[Path], layout: _Layout, sandbox_dir: Path, id_map: IdMap) -> None:
    """The overlay of idmapped template layers (see `corral.node.runtime.idmap`); the writable
    layer holds host ids, so its root belongs to the sandbox's root."""
    if is_mountpoint(layout.rootfs):
        return
    # The runtime reaches the rootfs from inside the user namespace, as the sandbox's root (an
    # unprivileged host uid): the directories on the way must be searchable, not listable.
    for directory in (sandbox_dir.parent, sandbox_dir):
        os.chmod(directory, 0o711)
    if os.stat(layout.upper).st_uid == 0:
        os.chown(layout.upper, id_map.base, id_map.base)
    mapped = idmapped_layers(layers, sandbox_dir / "lower", id_map)
    try:
        mount = overlay_mount(mapped, layout.upper, layout.work, layout.rootfs)
        apply_mount(Mount(mount.fstype, mount.source, mount.target, mount.options + _OVERLAY_EXTRA_OPTIONS))
    finally:
        release_layers(mapped)  # the overlay keeps private clones of its layers


def _mount_once(mount: Mount) -> None:
    if not is_mountpoint(Path(mount.target)):
        apply_mount(mount)


def _refuse_unsafe_rootfs(sandbox_id: str, rootfs: Path) -> None:
    """A template whose /dev, /proc, /tmp … are symlinks could make the runtime write host files
    (runc CVE-2026-41579, crun CVE-2026-47766): never boot one. Checked before the runtime starts,
    while no process of the sandbox can change its tree."""
    unsafe = unsafe_mount_targets(rootfs)
    if unsafe:
        raise FailedPrecondition(
            f"refusing to boot sandbox '{sandbox_id}': in its files {', '.join(unsafe)} "
            "must be real directories, not symlinks"
        )


def _config_cpus(path: Path) -> tuple[int, ...]:
    """The cpuset a sandbox was booted with, from its config.json (empty when unknown)."""
    try:
        config = json.loads((path / "config.json").read_text())
        return parse_cpuset(config["linux"]["resources"]["cpu"].get("cpus", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return ()
