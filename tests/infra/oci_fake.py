"""A loopback fake of the parts of OCI's Core Services API (20160918) that ``infra.oci`` uses.

It checks every request's HTTP signature with the public half of the test's throwaway key, as
OCI does (a request signed wrongly gets 401), keeps instances, VNICs, shapes, subnets and
security lists in memory, pages its lists, and fails calls on demand (`fail`).
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

BASE = "/20160918"
_SIG = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class ApiKey:
    """A throwaway API signing key and the config dict (and file) the SDK reads."""

    private_pem: bytes
    public_key: rsa.RSAPublicKey
    fingerprint: str
    tenancy: str = "ocid1.tenancy.oc1..fake"
    user: str = "ocid1.user.oc1..fake"
    region: str = "us-ashburn-1"

    @classmethod
    def generate(cls) -> ApiKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        digest = hashlib.md5(der).hexdigest()
        return cls(
            private_pem=key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()),
            public_key=key.public_key(),
            fingerprint=":".join(digest[i:i + 2] for i in range(0, 32, 2)))

    @property
    def key_id(self) -> str:
        return f"{self.tenancy}/{self.user}/{self.fingerprint}"

    def write_config(self, directory: Path, profile: str = "DEFAULT") -> Path:
        """An ~/.oci/config as `oci setup config` writes it."""
        key_file = directory / "oci_api_key.pem"
        key_file.write_bytes(self.private_pem)
        config = directory / "config"
        config.write_text(f"[{profile}]\nuser={self.user}\nfingerprint={self.fingerprint}\n"
                          f"tenancy={self.tenancy}\nregion={self.region}\nkey_file={key_file}\n")
        return config


@dataclass
class Fault:
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    after: bool = False     # do the operation, then answer with the error (a lost response)


class FakeOCI:
    """State and behaviour; `start()` serves it on a free loopback port."""

    def __init__(self, key: ApiKey, *, page_size: int = 2) -> None:
        self.key = key
        # keyId -> public key: the API key, plus any instance-principal session a test adds.
        self.keys: dict[str, rsa.RSAPublicKey] = {key.key_id: key.public_key}
        self.page_size = page_size
        self.lock = threading.Lock()
        self.instances: dict[str, dict[str, Any]] = {}
        self.attachments: dict[str, dict[str, Any]] = {}
        self.vnics: dict[str, dict[str, Any]] = {}
        self.shapes: dict[str, list[str]] = {}          # availability domain -> shapes
        self.subnets: dict[str, dict[str, Any]] = {}
        self.security_lists: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []                      # operation names, in arrival order
        self.rejected: list[str] = []                   # operations refused for their signature
        self.retry_tokens: dict[str, str] = {}
        self.faults: dict[str, list[Fault]] = {}
        self.boot_on_launch = False
        self.lag_listing = False
        self._ips = itertools.count(2)
        self._server: ThreadingHTTPServer | None = None

    # -- control ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeOCI:
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def fail(self, operation: str, status: int, code: str, message: str = "", *, times: int = 1,
             headers: dict[str, str] | None = None, after: bool = False) -> None:
        """The next `times` calls of `operation` (e.g. "LaunchInstance") answer with an error;
        with `after`, the operation is done first, as when a response is lost on the way."""
        with self.lock:
            self.faults.setdefault(operation, []).extend(
                Fault(status, code, message or code, headers or {}, after) for _ in range(times))

    def boot(self, instance_id: str | None = None) -> None:
        """Instances (all provisioning ones by default) become RUNNING with a primary VNIC."""
        with self.lock:
            for inst in self.instances.values():
                if inst["lifecycleState"] == "PROVISIONING" and instance_id in (None, inst["id"]):
                    self._boot(inst)

    def reap(self) -> None:
        with self.lock:
            for inst in self.instances.values():
                if inst["lifecycleState"] == "TERMINATING":
                    inst["lifecycleState"] = "TERMINATED"

    def _boot(self, inst: dict[str, Any]) -> None:
        inst["lifecycleState"] = "RUNNING"
        inst["_listed"] = True
        n = next(self._ips)
        vnic_id = f"ocid1.vnic.oc1..{uuid.uuid4().hex[:12]}"
        self.vnics[vnic_id] = {
            "id": vnic_id, "isPrimary": True, "privateIp": f"10.0.0.{n}",
            "publicIp": f"203.0.113.{n}" if inst["_public"] else None,
            "subnetId": inst["_subnet"], "lifecycleState": "AVAILABLE"}
        att_id = f"ocid1.vnicattachment.oc1..{uuid.uuid4().hex[:12]}"
        self.attachments[att_id] = {
            "id": att_id, "instanceId": inst["id"], "vnicId": vnic_id,
            "compartmentId": inst["compartmentId"], "lifecycleState": "ATTACHED",
            "availabilityDomain": inst["availabilityDomain"], "subnetId": inst["_subnet"]}

    # -- API --------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: Any,
               headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        route = path[len(BASE):]
        parts = route.strip("/").split("/")
        op = _OPERATIONS.get((method, parts[0], len(parts)))
        if op is None:
            return 404, {"code": "NotFound", "message": f"no route {method} {path}"}, {}
        with self.lock:
            self.calls.append(op)
            queue = self.faults.get(op)
            fault = queue.pop(0) if queue else None
            if fault is None or fault.after:
                answer = getattr(self, "_" + op)(parts[1] if len(parts) > 1 else None,
                                                 query, body, headers)
            if fault is None:
                return answer
            return fault.status, {"code": fault.code, "message": fault.message}, fault.headers

    def _page(self, items: list[Any], query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        start = int(query.get("page", 0))
        chunk = items[start:start + self.page_size]
        more = start + self.page_size < len(items)
        return 200, chunk, ({"opc-next-page": str(start + self.page_size)} if more else {})

    def _public(self, record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if not k.startswith("_")}

    def _LaunchInstance(self, _, query, body, headers):
        token = headers.get("opc-retry-token")
        if token in self.retry_tokens:
            return 200, self._public(self.instances[self.retry_tokens[token]]), {}
        if body["shape"] not in self.shapes.get(body["availabilityDomain"], []):
            return 400, {"code": "InvalidParameter",
                         "message": f"Shape {body['shape']} not found"}, {}
        inst_id = f"ocid1.instance.oc1..{uuid.uuid4().hex[:12]}"
        vnic = body.get("createVnicDetails") or {}
        inst = {
            "id": inst_id, "compartmentId": body["compartmentId"],
            "availabilityDomain": body["availabilityDomain"], "shape": body["shape"],
            "displayName": body.get("displayName"), "lifecycleState": "PROVISIONING",
            "freeformTags": body.get("freeformTags") or {}, "region": "iad",
            "metadata": body.get("metadata") or {}, "timeCreated": "2026-01-01T00:00:00.000Z",
            "sourceDetails": body.get("sourceDetails"), "shapeConfig": body.get("shapeConfig"),
            "_public": bool(vnic.get("assignPublicIp")), "_subnet": vnic.get("subnetId"),
            "_listed": not self.lag_listing}
        self.instances[inst_id] = inst
        if token:
            self.retry_tokens[token] = inst_id
        if self.boot_on_launch:
            self._boot(inst)
        return 200, self._public(inst), {}

    def _ListInstances(self, _, query, body, headers):
        items = [self._public(i) for i in self.instances.values()
                 if i["compartmentId"] == query["compartmentId"] and i["_listed"]
                 and query.get("availabilityDomain") in (None, i["availabilityDomain"])]
        return self._page(items, query)

    def _instance(self, inst_id):
        inst = self.instances.get(inst_id)
        if inst is None or inst["lifecycleState"] == "TERMINATED" and inst.get("_purged"):
            return None
        return inst

    def _GetInstance(self, inst_id, query, body, headers):
        inst = self._instance(inst_id)
        if inst is None:
            return 404, {"code": "NotAuthorizedOrNotFound", "message": "not found"}, {}
        return 200, self._public(inst), {}

    def _UpdateInstance(self, inst_id, query, body, headers):
        inst = self._instance(inst_id)
        if inst is None:
            return 404, {"code": "NotAuthorizedOrNotFound", "message": "not found"}, {}
        if "freeformTags" in body:
            inst["freeformTags"] = dict(body["freeformTags"])     # replaces the whole set
        return 200, self._public(inst), {}

    def _TerminateInstance(self, inst_id, query, body, headers):
        inst = self._instance(inst_id)
        if inst is None:
            return 404, {"code": "NotAuthorizedOrNotFound", "message": "not found"}, {}
        if inst["lifecycleState"] != "TERMINATED":
            inst["lifecycleState"] = "TERMINATING"
        inst["_preserve_boot_volume"] = query.get("preserveBootVolume")
        return 204, None, {}

    def _ListVnicAttachments(self, _, query, body, headers):
        items = [a for a in self.attachments.values()
                 if a["compartmentId"] == query["compartmentId"]
                 and query.get("instanceId") in (None, a["instanceId"])]
        return self._page(items, query)

    def _GetVnic(self, vnic_id, query, body, headers):
        if vnic_id not in self.vnics:
            return 404, {"code": "NotAuthorizedOrNotFound", "message": "not found"}, {}
        return 200, self.vnics[vnic_id], {}

    def _ListShapes(self, _, query, body, headers):
        ad = query.get("availabilityDomain")
        if ad is not None and ad not in self.shapes:
            return 400, {"code": "InvalidParameter",
                         "message": f"Invalid availabilityDomain {ad}"}, {}
        names = self.shapes.get(ad, []) if ad else sorted({s for v in self.shapes.values()
                                                            for s in v})
        return self._page([{"shape": s, "gpus": 1 if ".GPU." in s else 0} for s in names],
                          query)

    def _GetSubnet(self, subnet_id, query, body, headers):
        if subnet_id not in self.subnets:
            return 404, {"code": "NotAuthorizedOrNotFound", "message": "not found"}, {}
        return 200, self.subnets[subnet_id], {}

    def _GetSecurityList(self, sl_id, query, body, headers):
        if sl_id not in self.security_lists:
            return 404, {"code": "NotAuthorizedOrNotFound", "message": "not found"}, {}
        return 200, self.security_lists[sl_id], {}

    def _UpdateSecurityList(self, sl_id, query, body, headers):
        if sl_id not in self.security_lists:
            return 404, {"code": "NotAuthorizedOrNotFound", "message": "not found"}, {}
        self.security_lists[sl_id].update(
            {k: v for k, v in body.items() if k in ("ingressSecurityRules", "egressSecurityRules")})
        return 200, self.security_lists[sl_id], {}

    # -- signatures -------------------------------------------------------------------------------

    def verify(self, method: str, target: str, headers: dict[str, str], body: bytes) -> str | None:
        """None if the request is signed by our key as OCI requires, else why not."""
        auth = headers.get("authorization", "")
        if not auth.startswith("Signature "):
            return "no Signature authorization"
        fields = dict(_SIG.findall(auth))
        if fields.get("algorithm") != "rsa-sha256" or fields.get("version") != "1":
            return f"bad algorithm/version: {fields}"
        public_key = self.keys.get(fields.get("keyId", ""))
        if public_key is None:
            return f"unknown keyId {fields.get('keyId')}"
        signed = fields.get("headers", "").split()
        required = {"date", "(request-target)", "host"}
        if method in ("POST", "PUT", "PATCH"):
            required |= {"content-length", "content-type", "x-content-sha256"}
            digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
            if headers.get("x-content-sha256") != digest:
                return "x-content-sha256 does not match the body"
        if not required <= set(signed):
            return f"unsigned headers: {sorted(required - set(signed))}"
        lines = [f"(request-target): {method.lower()} {target}" if h == "(request-target)"
                 else f"{h}: {headers.get(h, '')}" for h in signed]
        try:
            public_key.verify(base64.b64decode(fields["signature"]),
                                       "\n".join(lines).encode(), padding.PKCS1v15(),
                                       hashes.SHA256())
        except Exception as exc:  # noqa: BLE001 - any failure is a bad signature
            return f"signature does not verify: {exc!r}"
        return None


_OPERATIONS = {
    ("POST", "instances", 1): "LaunchInstance",
    ("GET", "instances", 1): "ListInstances",
    ("GET", "instances", 2): "GetInstance",
    ("PUT", "instances", 2): "UpdateInstance",
    ("DELETE", "instances", 2): "TerminateInstance",
    ("GET", "vnicAttachments", 1): "ListVnicAttachments",
    ("GET", "vnics", 2): "GetVnic",
    ("GET", "shapes", 1): "ListShapes",
    ("GET", "subnets", 2): "GetSubnet",
    ("GET", "securityLists", 2): "GetSecurityList",
    ("PUT", "securityLists", 2): "UpdateSecurityList",
}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOCI
    protocol_version = "HTTP/1.1"
    # One segment per response, no Nagle: otherwise each keep-alive request waits ~40 ms on a
    # delayed ACK.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        split = urlsplit(self.path)
        problem = self.fake.verify(self.command, self.path, headers, raw)
        if problem is not None:
            with self.fake.lock:
                self.fake.rejected.append(f"{self.command} {split.path}: {problem}")
            status, payload, extra = 401, {"code": "NotAuthenticated", "message": problem}, {}
        else:
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            status, payload, extra = self.fake.handle(
                self.command, split.path, query, json.loads(raw) if raw else None, headers)
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("opc-request-id", uuid.uuid4().hex)
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve


# -- fixtures (imported by the test_oci_* modules) ----------------------------------------------

COMPARTMENT = "ocid1.compartment.oc1..cluster"
AD = "Uocm:US-ASHBURN-AD-1"
SUBNET = "ocid1.subnet.oc1..nodes"
SECURITY_LIST = "ocid1.securitylist.oc1..nodes"
GPU_SHAPES = ("VM.GPU.A10.1", "VM.GPU.A10.2", "BM.GPU.A100-v2.8", "BM.GPU.H100.8")


def provider_section(config_file: Path, **extra: Any) -> dict[str, Any]:
    """A `provider:` section as the cluster YAML has it, with a config file of our key."""
    return {"type": "external", "module": "infra.oci.node_provider.OCINodeProvider",
            "compartment_id": COMPARTMENT, "availability_domain": AD, "subnet_id": SUBNET,
            "image_id": "ocid1.image.oc1..ubuntu", "config_file": str(config_file),
            "ssh_authorized_keys": "ssh-ed25519 AAAA test", **extra}


@contextmanager
def running_fake(key: ApiKey) -> Iterator[FakeOCI]:
    """A started fake with one availability domain offering the GPU shapes, a subnet and its
    security list (wide open, as a new VCN's default list is). Fails the test if any request
    was refused for its signature and the test did not clear `rejected`."""
    fake = FakeOCI(key)
    fake.shapes[AD] = ["VM.Standard.E5.Flex", *GPU_SHAPES]
    fake.subnets[SUBNET] = {"id": SUBNET, "cidrBlock": "10.0.0.0/24",
                            "compartmentId": COMPARTMENT, "securityListIds": [SECURITY_LIST]}
    fake.security_lists[SECURITY_LIST] = {
        "id": SECURITY_LIST, "compartmentId": COMPARTMENT, "lifecycleState": "AVAILABLE",
        "ingressSecurityRules": [{"protocol": "all", "source": "0.0.0.0/0"}],
        "egressSecurityRules": [{"protocol": "all", "destination": "0.0.0.0/0"}]}
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
    assert not fake.rejected, fake.rejected


class LoopbackOCINodeProvider:
    """`provider.module` for tests that let Ray build the provider itself (the autoscaler):
    our provider with its clients aimed at the fake named by `provider.loopback_endpoint`."""

    def __new__(cls, provider_config: dict[str, Any], cluster_name: str):
        from infra.oci.clients import build_clients
        from infra.oci.node_provider import OCINodeProvider

        config = dict(provider_config)
        endpoint = config.pop("loopback_endpoint")
        return OCINodeProvider(config, cluster_name, client_factory=lambda cfg: build_clients(
            cfg, service_endpoint=endpoint))
