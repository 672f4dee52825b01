"""Ray's node provider for Oracle Cloud: ``provider: {type: external, module:
infra.oci.node_provider.OCINodeProvider}``.

Nodes are OCI instances carrying Ray's tags as freeform tags; a cluster's nodes are those of its
compartment and availability domain whose ``ray-cluster-name`` tag is the cluster's name (the
List Instances API has no tag filter, so we filter). IPs come from the primary VNIC.

The autoscaler calls a provider from several threads (the main loop, node launchers, updaters):
every shared dict is read and written under ``_lock``, and a node's tags are read, merged and
written under that node's own lock, because OCI replaces the whole freeform tag set on update.
"""
from __future__ import annotations

import copy
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND

from infra.oci.clients import Backoff, OCIClients, OCIProviderConfig, build_clients

# Everything else (PROVISIONING, STARTING, RUNNING, STOPPING, STOPPED, MOVING, CREATING_IMAGE)
# is a node Ray must see: a stopped instance still costs its boot volume, and Ray terminates
# nodes it sees but cannot reach.
GONE_STATES = frozenset({"TERMINATING", "TERMINATED"})
# OCI's list is eventually consistent: an instance just launched can miss a listing. Until it
# shows up (or this long passes) it counts as a node, or the autoscaler would launch it again.
LISTING_LAG_S = 120.0


class OCINodeConfig(BaseModel):
    """A node type's `node_config` in the cluster YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: str = Field(description="e.g. `VM.GPU.A10.1`, `BM.GPU.H100.8`, `VM.Standard.E5.Flex`.")
    image_id: str | None = Field(None, description="Defaults to the provider's `image_id`.")
    ocpus: float | None = Field(None, gt=0, description="Flex shapes only.")
    memory_gbs: float | None = Field(None, gt=0, description="Flex shapes only.")
    boot_volume_size_gbs: int = Field(200, ge=50, description="Room for the image and weights.")
    assign_public_ip: bool = Field(False, description="The head's, for `ray up` over SSH.")


@dataclass(frozen=True)
class _Node:
    id: str
    state: str
    tags: Mapping[str, str] = field(default_factory=dict)


class OCINodeProvider(NodeProvider):
    """Launch, list (by freeform tags), tag and terminate OCI instances for one Ray cluster."""

    def __init__(
        self,
        provider_config: dict[str, Any],
        cluster_name: str,
        client_factory: Callable[[OCIProviderConfig], OCIClients] = build_clients,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(provider_config, cluster_name)
        self.settings = OCIProviderConfig.from_provider(provider_config)
        self._client_factory = client_factory
        self._backoff = backoff or Backoff()
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: OCIClients | None = None
        self._nodes: dict[str, _Node] = {}
        self._launched: dict[str, float] = {}           # not yet seen in a listing: launch time
        self._written: dict[str, dict[str, str]] = {}   # tags written, until a listing shows them
        self._terminating: set[str] = set()             # until a listing shows them going
        self._tag_locks: dict[str, threading.Lock] = {}
        self._ips: dict[str, tuple[str, str | None]] = {}

    # -- the SDK, lazily: constructing a provider (ray up does, to bootstrap) needs no I/O --------

    @property
    def clients(self) -> OCIClients:
        with self._lock:
            if self._clients is None:
                self._clients = self._client_factory(self.settings)
            return self._clients

    def _call(self, fn: Callable[[], Any]) -> Any:
        return self._backoff.call(fn)

    # -- listing ----------------------------------------------------------------------------------

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        listed = self._backoff.list_all(
            self.clients.compute.list_instances, self.settings.compartment_id,
            availability_domain=self.settings.availability_domain)
        now = self._clock()
        with self._lock:
            seen: dict[str, _Node] = {}
            for inst in listed:
                tags = dict(inst.freeform_tags or {})
                if tags.get(TAG_RAY_CLUSTER_NAME) != self.cluster_name:
                    continue
                written = self._written.get(inst.id)
                if written is not None:
                    if all(tags.get(k) == v for k, v in written.items()):
                        del self._written[inst.id]
                    else:
                        tags = {**tags, **written}
                state = inst.lifecycle_state
                if inst.id in self._terminating:
                    if state in GONE_STATES:
                        self._terminating.discard(inst.id)
                    else:
                        state = "TERMINATING"       # a listing from before our terminate call
                seen[inst.id] = _Node(inst.id, state, tags)
                self._launched.pop(inst.id, None)
            for node_id, launched_at in list(self._launched.items()):
                if now - launched_at > LISTING_LAG_S:
                    del self._launched[node_id]
                elif node_id in self._nodes:
                    seen[node_id] = self._nodes[node_id]
            self._nodes = seen
            return [n.id for n in seen.values() if n.state not in GONE_STATES
                    and all(n.tags.get(k) == v for k, v in tag_filters.items())]

    def _node(self, node_id: str) -> _Node | None:
        with self._lock:
            node = self._nodes.get(node_id)
        if node is not None:
            return node
        from oci.exceptions import ServiceError

        compute = self.clients.compute
        try:
            inst = self._call(lambda: compute.get_instance(node_id).data)
        except ServiceError as exc:
            if exc.status == 404:
                return None
            raise
        node = _Node(inst.id, inst.lifecycle_state, dict(inst.freeform_tags or {}))
        with self._lock:
            return self._nodes.setdefault(node_id, node)

    def is_running(self, node_id: str) -> bool:
        node = self._node(node_id)
        return node is not None and node.state == "RUNNING"

    def is_terminated(self, node_id: str) -> bool:
        node = self._node(node_id)
        return node is None or node.state in GONE_STATES

    def node_tags(self, node_id: str) -> dict[str, str]:
        node = self._node(node_id)
        return dict(node.tags) if node is not None else {}

    # -- IPs: the primary VNIC's ------------------------------------------------------------------

    def _addresses(self, node_id: str) -> tuple[str, str | None] | None:
        with self._lock:
            if node_id in self._ips:
                return self._ips[node_id]
        c = self.clients
        attachments = self._backoff.list_all(
            c.compute.list_vnic_attachments, self.settings.compartment_id, instance_id=node_id)
        for att in attachments:
            if att.lifecycle_state != "ATTACHED" or not att.vnic_id:
                continue
            vnic = self._call(lambda a=att: c.network.get_vnic(a.vnic_id).data)
            if vnic.is_primary and vnic.private_ip:
                with self._lock:
                    self._ips[node_id] = (vnic.private_ip, vnic.public_ip)
                return vnic.private_ip, vnic.public_ip
        return None     # still provisioning: Ray's updater waits for an IP

    def internal_ip(self, node_id: str) -> str | None:
        addresses = self._addresses(node_id)
        return addresses[0] if addresses else None

    def external_ip(self, node_id: str) -> str | None:
        addresses = self._addresses(node_id)
        return addresses[1] if addresses else None

    # -- changes ----------------------------------------------------------------------------------

    def create_node(self, node_config: dict[str, Any], tags: dict[str, str],
                    count: int) -> dict[str, Any]:
        import oci
        from oci.exceptions import ServiceError

        node = OCINodeConfig(**node_config)
        image_id = node.image_id or self.settings.image_id
        if not image_id:
            raise ValueError(f"no image_id for shape {node.shape}: set it in the node type's "
                             "node_config or in provider.image_id")
        all_tags = {**tags, TAG_RAY_CLUSTER_NAME: self.cluster_name}
        kind = all_tags.get(TAG_RAY_NODE_KIND, "node")
        m = oci.core.models
        compute = self.clients.compute
        created: dict[str, Any] = {}
        for _ in range(count):
            details = m.LaunchInstanceDetails(
                compartment_id=self.settings.compartment_id,
                availability_domain=self.settings.availability_domain,
                shape=node.shape,
                shape_config=(m.LaunchInstanceShapeConfigDetails(
                    ocpus=node.ocpus, memory_in_gbs=node.memory_gbs)
                    if node.ocpus or node.memory_gbs else None),
                display_name=f"ray-{self.cluster_name}-{kind}-{uuid.uuid4().hex[:8]}",
                source_details=m.InstanceSourceViaImageDetails(
                    image_id=image_id, boot_volume_size_in_gbs=node.boot_volume_size_gbs),
                create_vnic_details=m.CreateVnicDetails(
                    subnet_id=self.settings.subnet_id, assign_public_ip=node.assign_public_ip),
                metadata=({"ssh_authorized_keys": self.settings.ssh_authorized_keys}
                          if self.settings.ssh_authorized_keys else None),
                freeform_tags=all_tags,
            )
            # One token per instance, reused by every retry: OCI then launches it at most once
            # even if a throttled or timed-out request had in fact gone through.
            token = uuid.uuid4().hex
            try:
                inst = self._call(lambda d=details, t=token: compute.launch_instance(
                    d, opc_retry_token=t).data)
            except ServiceError as exc:
                raise NodeLaunchException(
                    category=exc.code or str(exc.status),
                    description=f"{node.shape}: {exc.message}",
                    src_exc_info=sys.exc_info()) from exc
            with self._lock:
                self._nodes[inst.id] = _Node(inst.id, inst.lifecycle_state, all_tags)
                self._launched[inst.id] = self._clock()
            created[inst.id] = inst
        return created

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        import oci

        with self._lock:
            node_lock = self._tag_locks.setdefault(node_id, threading.Lock())
        with node_lock:
            node = self._node(node_id)
            merged = {**(node.tags if node else {}), **tags}
            compute = self.clients.compute
            inst = self._call(lambda: compute.update_instance(
                node_id, oci.core.models.UpdateInstanceDetails(freeform_tags=merged)).data)
            with self._lock:
                self._written[node_id] = merged
                state = node.state if node else inst.lifecycle_state
                self._nodes[node_id] = _Node(node_id, state, merged)

    def terminate_node(self, node_id: str) -> None:
        from oci.exceptions import ServiceError

        compute = self.clients.compute
        try:
            self._call(lambda: compute.terminate_instance(node_id, preserve_boot_volume=False))
        except ServiceError as exc:
            if exc.status != 404:
                raise
        with self._lock:
            node = self._nodes.get(node_id)
            if node is not None:
                self._nodes[node_id] = _Node(node_id, "TERMINATING", node.tags)
            self._terminating.add(node_id)
            self._launched.pop(node_id, None)
            self._ips.pop(node_id, None)
            self._tag_locks.pop(node_id, None)

    # -- cluster config ---------------------------------------------------------------------------

    @staticmethod
    def bootstrap_config(cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Check the provider section, and put the SSH public key in it for the nodes."""
        config = copy.deepcopy(cluster_config)
        provider = config["provider"]
        settings = OCIProviderConfig.from_provider(provider)
        for node_type in config.get("available_node_types", {}).values():
            OCINodeConfig(**node_type.get("node_config", {}))
        if not settings.ssh_authorized_keys:
            auth = config.get("auth", {})
            path = auth.get("ssh_public_key") or (
                auth["ssh_private_key"] + ".pub" if auth.get("ssh_private_key") else None)
            if path is None:
                raise ValueError("auth.ssh_private_key (and its .pub) or auth.ssh_public_key is "
                                 "needed: OCI nodes accept SSH keys only at launch")
            provider["ssh_authorized_keys"] = Path(path).expanduser().read_text().strip()
        return config

    def prepare_for_head_node(self, cluster_config: dict[str, Any]) -> dict[str, Any]:
        """The head's autoscaler authenticates as its instance (a dynamic group), not with the
        laptop's API key, which never leaves the laptop."""
        config = copy.deepcopy(cluster_config)
        config["provider"]["auth"] = "instance_principal"
        for key in ("config_file", "profile"):
            config["provider"].pop(key, None)
        return config
