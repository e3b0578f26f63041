"""Sandbox network policies in the control plane: E2B's `network` config at create, `PUT
/sandboxes/{id}/network`, and what the API reports about them.

Create (`POST /sandboxes`, e2b-protocol.md §2.1): `network.allowOut` / `denyOut` (IPs, CIDRs,
domains, optional ports), `allowPublicTraffic` (false: a `trafficAccessToken` is issued and required
on the sandbox's public ports; needs `secure`), `maskRequestHost` (the Host the sandbox's ports see,
`${PORT}` substituted), and `allow_internet_access` (false: deny ALL_TRAFFIC, keep allowOut).
`egressProxy` and `rules` (header transforms) are refused with 400: this server does neither.

Update (`PUT /sandboxes/{id}/network`, body `SandboxNetworkUpdateConfig`): replaces the whole egress
config, as E2B does (omitted lists are cleared, an omitted `allow_internet_access` means true);
ingress settings stay, except `maskRequestHost` when given. Applied to the running sandbox at once.

Fork (`POST /sandboxes/{id}/fork`, which has no network fields): each fork starts with its
parent's settings as they are now (`inherit`): egress rules and `allow_internet_access`,
`allowPublicTraffic` and `maskRequestHost`; a fork closed to the public gets a traffic access
token of its own (returned in its create answer, as for any new sandbox), so a token leaked from
one sandbox opens no other. A sandbox created from a snapshot is a create like any other: the
request's settings apply (a snapshot is a template and keeps files only).

The database row (`sandbox_networks`) is the record; the node's network applies the policy
(`SandboxNetwork.set_policy`) and asks `policy_for` for it whenever it attaches a sandbox (create,
and anything that re-attaches one), so a policy can never be forgotten between the two. At create
the plan is staged in memory first (the row it references does not exist yet) and recorded when
the node's attach asks for it, which is after the sandbox's row was inserted.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import time
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import delete, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import sessionmaker

from corral.core.errors import InvalidArgument, NotFound
from corral.core.ids import new_access_token
from corral.core.sandbox import SandboxState
from corral.node.network.policy import EgressPolicy, IngressPolicy, NetworkPolicy, PolicyError
from corral.server.store._models import SandboxNetworkModel

__all__ = ["NetworkConfig", "NetworkPlan", "NetworkPolicies", "NetworkUpdateRequest", "plan_network"]

log = logging.getLogger(__name__)

_MASK_RE = re.compile(r"^[A-Za-z0-9._\-\[\]:]{1,255}$")
_STAGED_TTL_S = 600.0  # a create that never reached its attach (it failed first) is forgotten


class NetworkConfig(BaseModel):
    """`network` of `POST /sandboxes` (E2B `SandboxNetworkConfig`)."""

    model_config = ConfigDict(extra="ignore", validate_by_name=True, validate_by_alias=True)

    allow_public_traffic: bool = Field(True, alias="allowPublicTraffic")
    allow_out: list[str] | None = Field(None, alias="allowOut")
    deny_out: list[str] | None = Field(None, alias="denyOut")
    mask_request_host: str | None = Field(None, alias="maskRequestHost")
    egress_proxy: dict[str, Any] | None = Field(None, alias="egressProxy")
    rules: dict[str, Any] | None = None


class NetworkUpdateRequest(BaseModel):
    """Body of `PUT /sandboxes/{id}/network` (E2B `SandboxNetworkUpdateConfig`)."""

    model_config = ConfigDict(extra="ignore", validate_by_name=True, validate_by_alias=True)

    allow_out: list[str] | None = Field(None, alias="allowOut")
    deny_out: list[str] | None = Field(None, alias="denyOut")
    # The Python SDK sends this key in snake_case (as at create); accept camelCase too.
    allow_internet_access: bool | None = Field(
        None, validation_alias=AliasChoices("allow_internet_access", "allowInternetAccess")
    )
    mask_request_host: str | None = Field(None, alias="maskRequestHost")
    egress_proxy: dict[str, Any] | None = Field(None, alias="egressProxy")
    rules: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class NetworkPlan:
    """A validated network config: what the API reports (`config`) and what the node enforces."""

    config: dict[str, Any]
    policy: NetworkPolicy


def _refuse_unsupported(
    egress_proxy: dict[str, Any] | None, rules: dict[str, Any] | None, where: str
) -> None:
    if egress_proxy:
        raise InvalidArgument(f"{where}egressProxy is not supported by this server")
    if rules:
        raise InvalidArgument(f"{where}rules (request transforms) are not supported by this server")


def _check_mask(mask: str | None) -> str | None:
    if mask is None:
        return None
    if not _MASK_RE.match(mask.replace("${PORT}", "1")):
        raise InvalidArgument(f"invalid maskRequestHost {mask!r}: want a host[:port], ${{PORT}} allowed")
    return mask


def _egress(
    allow_out: list[str] | None, deny_out: list[str] | None, allow_internet_access: bool
) -> EgressPolicy:
    try:
        return EgressPolicy.from_lists(allow_out, deny_out, allow_internet_access=allow_internet_access)
    except PolicyError as exc:
        raise InvalidArgument(str(exc)) from None


def plan_network(
    network: dict[str, Any] | None, *, allow_internet_access: bool, secure: bool
) -> NetworkPlan | None:
    """Validate create's `network` and `allow_internet_access` (InvalidArgument → 400). None when
    there is nothing beyond the defaults to keep (no config, internet allowed)."""
    if network is None and allow_internet_access:
        return None
    try:
        config = NetworkConfig.model_validate(network or {})
    except ValidationError as exc:
        raise InvalidArgument(f"invalid network config: {exc.errors(include_url=False)[0]['msg']}") from None
    _refuse_unsupported(config.egress_proxy, config.rules, "network.")
    if not config.allow_public_traffic and not secure:
        raise InvalidArgument("network.allowPublicTraffic=false requires secure=true")
    egress = _egress(config.allow_out, config.deny_out, allow_internet_access)
    ingress = IngressPolicy(
        traffic_access_token=None if config.allow_public_traffic else new_access_token(),
        mask_request_host=_check_mask(config.mask_request_host),
    )
    reported: dict[str, Any] = {"allowPublicTraffic": config.allow_public_traffic}
    if config.allow_out is not None:
        reported["allowOut"] = list(config.allow_out)
    if config.deny_out is not None:
        reported["denyOut"] = list(config.deny_out)
    if config.mask_request_host is not None:
        reported["maskRequestHost"] = config.mask_request_host
    return NetworkPlan(reported, NetworkPolicy(egress, ingress))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class NetworkPolicies:
    """Keeps the `sandbox_networks` table and the node's network in step.

    `store` is the control plane's `Store` (its engine is shared; the table is this module's);
    `network` the node's `SandboxNetwork` (or anything with `set_policy`; None: record only). Construction registers
    `policy_for` as the network's source of policies for sandboxes it attaches.
    """

    def __init__(self, store: Any, network: Any) -> None:
        self._store = store
        self._network = network
        self._sessions: sessionmaker[Any] | None = None
        self._staged: dict[str, tuple[float, NetworkPlan | None]] = {}  # None: the default, nothing to record
        if hasattr(network, "policy_source"):
            network.policy_source = self.policy_for

    def _session(self) -> Any:
        if self._sessions is None:  # the store's engine exists once it has been opened
            self._sessions = sessionmaker(self._store.engine, expire_on_commit=False)
        return self._sessions()

    # -- create ------------------------------------------------------------------------------

    def plan(self, req: Any) -> NetworkPlan | None:
        """Validate a create request's network settings before anything exists."""
        return plan_network(req.network, allow_internet_access=req.allow_internet_access, secure=req.secure)

    def stage(self, sandbox_id: str, plan: NetworkPlan | None) -> None:
        """Keep a new sandbox's plan until its network is attached (`policy_for` records it)."""
        now = time.monotonic()
        for stale in [i for i, (at, _) in self._staged.items() if now - at > _STAGED_TTL_S]:
            del self._staged[stale]
        self._staged[sandbox_id] = (now, plan)  # a new sandbox: its attach needs no database read

    def inherit(self, parent_id: str, child_id: str) -> None:
        """Stage for a new fork its parent's settings (see the module docstring)."""
        config, token = self._read(parent_id)
        policy = self._recorded_policy(parent_id, config, token)
        if config is None or policy is None:
            self.stage(child_id, None)
            return
        ingress = IngressPolicy(new_access_token() if token else None, policy.ingress.mask_request_host)
        self.stage(child_id, NetworkPlan(dict(config), NetworkPolicy(policy.egress, ingress)))

    # -- update ------------------------------------------------------------------------------

    async def update(self, team_id: str, sandbox_id: str, body: NetworkUpdateRequest) -> None:
        """`PUT /sandboxes/{id}/network`: replace the egress config now (NotFound: 404)."""
        row = self._store.get_sandbox(sandbox_id, team_id)
        if row is None or row.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
            raise NotFound(f'sandbox "{sandbox_id}" not found')
        _refuse_unsupported(body.egress_proxy, body.rules, "")
        allow_internet = True if body.allow_internet_access is None else body.allow_internet_access
        egress = _egress(body.allow_out, body.deny_out, allow_internet)
        config, token = self._read(sandbox_id)
        config = dict(config or {"allowPublicTraffic": token is None})
        config.pop("allowOut", None)
        config.pop("denyOut", None)
        if body.allow_out is not None:
            config["allowOut"] = list(body.allow_out)
        if body.deny_out is not None:
            config["denyOut"] = list(body.deny_out)
        if body.mask_request_host is not None:
            config["maskRequestHost"] = _check_mask(body.mask_request_host)
        ingress = IngressPolicy(token, config.get("maskRequestHost"))
        self._write(sandbox_id, config, token)
        if row.allow_internet_access != allow_internet:
            self._store.update_sandbox(sandbox_id, allow_internet_access=allow_internet)
        if self._network is not None:
            await self._network.set_policy(sandbox_id, NetworkPolicy(egress, ingress))

    # -- reading ------------------------------------------------------------------------------

    def config(self, sandbox_id: str) -> dict[str, Any] | None:
        """The `network` object of `GET /sandboxes/{id}` (None: created without one)."""
        return self._read(sandbox_id)[0]

    def traffic_access_token(self, sandbox_id: str) -> str | None:
        return self._read(sandbox_id)[1]

    def policy_for(self, sandbox_id: str) -> NetworkPolicy | None:
        """The policy the node enforces for a sandbox, rebuilt from the record; None without one
        (the node then goes by the sandbox's `allow_internet_access`)."""
        staged = self._staged.pop(sandbox_id, None)
        if staged is not None:
            plan = staged[1]
            if plan is None:
                return None
            self._write(sandbox_id, plan.config, plan.policy.ingress.traffic_access_token)
            return plan.policy
        config, token = self._read(sandbox_id)
        return self._recorded_policy(sandbox_id, config, token)

    def _recorded_policy(
        self, sandbox_id: str, config: dict[str, Any] | None, token: str | None
    ) -> NetworkPolicy | None:
        if config is None:
            return None
        row = self._store.get_sandbox(sandbox_id)
        allow_internet = True if row is None else row.allow_internet_access
        try:
            egress = EgressPolicy.from_lists(
                config.get("allowOut"), config.get("denyOut"), allow_internet_access=allow_internet
            )
        except PolicyError as exc:  # validated when written; a broken record fails closed
            log.error("network policy of sandbox %s unreadable (%s): no egress", sandbox_id, exc)
            return NetworkPolicy.default(False)
        return NetworkPolicy(egress, IngressPolicy(token, config.get("maskRequestHost")))

    # -- table -------------------------------------------------------------------------------

    def _read(self, sandbox_id: str) -> tuple[dict[str, Any] | None, str | None]:
        with self._session() as session:
            model = session.scalar(
                select(SandboxNetworkModel).where(SandboxNetworkModel.sandbox_id == sandbox_id)
            )
            return (None, None) if model is None else (dict(model.config), model.traffic_access_token)

    def _write(self, sandbox_id: str, config: dict[str, Any], token: str | None) -> None:
        values = {
            "sandbox_id": sandbox_id,
            "config": config,
            "traffic_access_token": token,
            "updated_at": _now(),
        }
        with self._session() as session, session.begin():
            if self._store.engine.dialect.name == "sqlite":
                statement = sqlite_insert(SandboxNetworkModel).values(**values)
                session.execute(statement.on_conflict_do_update(index_elements=["sandbox_id"], set_=values))
            else:  # portable: replace the row
                session.execute(
                    delete(SandboxNetworkModel).where(SandboxNetworkModel.sandbox_id == sandbox_id)
                )
                session.add(SandboxNetworkModel(**values))
