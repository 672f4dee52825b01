"""The one seam between our OCI code and Oracle's API: settings, authentication, clients, retries.

Everything else in ``infra.oci`` receives an :class:`OCIClients` and is otherwise pure.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

# Keys Ray itself puts in (or reads from) the `provider:` section; everything else is ours and
# checked, so that a typo fails `ray up` instead of being ignored.
RAY_PROVIDER_KEYS = frozenset({
    "type", "module", "_config_cache_path", "use_internal_ips", "cache_stopped_nodes",
    "foreground_node_launch", "disable_launch_config_check", "disable_node_updaters",
    "worker_liveness_check", "worker_rpc_drain",
})


class OCIProviderConfig(BaseModel):
    """The `provider:` section of an OCI cluster YAML, minus Ray's own keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    compartment_id: str = Field(description="Compartment the cluster's instances live in.")
    availability_domain: str = Field(description="e.g. `Uocm:US-ASHBURN-AD-1`.")
    subnet_id: str = Field(description="Subnet of every node; its security list guards them.")
    image_id: str | None = Field(None, description="Default image of node types that set none.")
    region: str | None = Field(None, description="Overrides the profile's region.")
    auth: Literal["config_file", "instance_principal"] = Field(
        "config_file", description="`config_file` on a laptop; the head node uses instance "
        "principals (set for it by the provider when `ray up` writes the head's config).")
    config_file: str = Field("~/.oci/config", description="OCI CLI/SDK config file.")
    profile: str = Field("DEFAULT", description="Profile in `config_file`.")
    ssh_authorized_keys: str | None = Field(
        None, description="Public key put on every node; filled from `auth.ssh_public_key`.")
    security_list_id: str | None = Field(
        None, description="The subnet's security list, written by `python -m infra.oci "
        "security-list`.")

    @classmethod
    def from_provider(cls, provider: dict[str, Any]) -> OCIProviderConfig:
        return cls(**{k: v for k, v in provider.items() if k not in RAY_PROVIDER_KEYS})


@dataclass(frozen=True)
class OCIClients:
    """The SDK clients we use; built once per provider (they are thread-safe for calls)."""

    compute: Any        # oci.core.ComputeClient
    network: Any        # oci.core.VirtualNetworkClient


def build_clients(
    cfg: OCIProviderConfig,
    *,
    service_endpoint: str | None = None,
    instance_principal_signer: Callable[[], Any] | None = None,
) -> OCIClients:
    """Authenticate as `cfg.auth` says and build the clients.

    ``service_endpoint`` replaces the regional endpoint (tests aim it at a loopback fake);
    ``instance_principal_signer`` replaces the SDK's signer class, which asks the instance
    metadata service for certificates when built.
    """
    import oci

    kwargs: dict[str, Any] = {"retry_strategy": oci.retry.NoneRetryStrategy()}
    if cfg.auth == "instance_principal":
        make_signer = (instance_principal_signer
                       or oci.auth.signers.InstancePrincipalsSecurityTokenSigner)
        signer = make_signer()
        config = {"region": cfg.region or signer.region}
        kwargs["signer"] = signer
    else:
        config = oci.config.from_file(str(Path(cfg.config_file).expanduser()), cfg.profile)
        if cfg.region:
            config["region"] = cfg.region
        oci.config.validate_config(config)
    if service_endpoint:
        kwargs["service_endpoint"] = service_endpoint
    return OCIClients(compute=oci.core.ComputeClient(config, **kwargs),
                      network=oci.core.VirtualNetworkClient(config, **kwargs))


# Throttling (429) and the gateway's transient statuses. Not 500: OCI answers "Out of host
# capacity" with 500, which no retry within seconds fixes.
RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class Backoff:
    """Bounded exponential backoff with full jitter, so throttled threads do not retry in step."""

    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 8.0
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[float, float], float] = random.uniform

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()`, again after a throttle, a gateway's transient status or a network failure
        (the SDK's ConnectTimeout is a RequestException), at most `attempts` times."""
        from oci.exceptions import RequestException, ServiceError

        for attempt in range(self.attempts):
            try:
                return fn()
            except ServiceError as exc:
                if exc.status not in RETRY_STATUSES or attempt == self.attempts - 1:
                    raise
                self.sleep(self.delay(attempt, exc.headers or {}))
            except RequestException:
                if attempt == self.attempts - 1:
                    raise
                self.sleep(self.delay(attempt, {}))
        raise AssertionError("unreachable")

    def list_all(self, list_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Every page of a List call, each page retried on its own. (The SDK's pagination
        helpers wrap calls in its default retry strategy, which sleeps up to minutes, on top.)"""
        items: list[Any] = []
        page: str | None = None
        while True:
            extra = {"page": page} if page else {}
            response = self.call(lambda extra=extra: list_fn(*args, **kwargs, **extra))
            items.extend(response.data)
            if not response.has_next_page:
                return items
            page = response.next_page

    def delay(self, attempt: int, headers: dict[str, str]) -> float:
        retry_after = {k.lower(): v for k, v in headers.items()}.get("retry-after")
        if retry_after is not None:
            try:
                return min(self.cap_s, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return self.jitter(0.0, min(self.cap_s, self.base_s * 2 ** attempt))
