from __future__ import annotations

import json
import os
import re

import pytest

# google-auth reads these when first imported: no probe of a metadata server (a cloud VM's
# credentials) may leave this machine, and a probe that slips through dials a closed loopback port.
os.environ["NO_GCE_CHECK"] = "true"
os.environ["GCE_METADATA_HOST"] = "127.0.0.1:9"
os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"

_CLOUD_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCLOUD_", "CLOUDSDK_", "OCI_")


@pytest.fixture(autouse=True)
def _no_cloud_credentials(monkeypatch, tmp_path_factory):
    """Cloud tests run against loopback fakes only: no credentials, project or config of the
    machine's user may reach a client library."""
    for name in list(os.environ):
        if name.startswith(_CLOUD_ENV_PREFIXES):
            monkeypatch.delenv(name)
    # gcloud's application-default credentials file lives under this folder: an empty one.
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path_factory.mktemp("gcloud")))
    monkeypatch.setenv("OCI_CONFIG_FILE", str(tmp_path_factory.mktemp("oci") / "config"))


class FakeComputeApi:
    """A loopback stand-in for the few Compute Engine REST calls the preflight makes, enough for
    the real google-cloud-compute client: aggregated accelerator types (one zone per page, so the
    client's pager is exercised), regions.get with quotas, firewalls list/get/insert/patch (insert and
    patch answer with a finished operation, or a failed one), images.getFromFamily. A project
    other than ``project`` gets 403, as for a disabled API or a missing permission."""

    def __init__(self, server, project: str = "acme-llm") -> None:
        self.server = server
        self.project = project
        self.zones: dict[str, dict[str, int]] = {}
        self.quotas: dict[str, dict[str, tuple[float, float]]] = {}
        self.firewalls: dict[str, dict] = {}
        self.families: dict[tuple[str, str], str] = {}
        self.operation_error: tuple[int, str] | None = None
        self.requests: list[tuple[str, str, dict, dict | None]] = []
        server.expect_request(re.compile(r"/compute/v1/.*")).respond_with_handler(self._handle)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def writes(self) -> list[tuple[str, str, dict | None]]:
        return [(m, p, b) for m, p, _, b in self.requests if m != "GET"]

    def _handle(self, request):
        body = json.loads(request.get_data() or b"null")
        self.requests.append((request.method, request.path, dict(request.args), body))
        parts = request.path.split("/")[3:]  # projects/<p>/...
        if parts[1] not in (self.project, "deeplearning-platform-release"):
            return _json({"error": {"code": 403, "message": f"Compute Engine API has not been "
                                    f"used in project {parts[1]} before or it is disabled."}}, 403)
        route = "/".join(parts[2:])
        if route == "aggregated/acceleratorTypes":
            return self._accelerators(request.args)
        if route.startswith("regions/"):
            region = parts[3]
            if region not in self.quotas:
                return _json({"error": {"code": 404, "message": f"region {region} not found"}}, 404)
            return _json({"name": region, "quotas": [
                {"metric": m, "limit": limit, "usage": usage}
                for m, (limit, usage) in self.quotas[region].items()]})
        if route.startswith("global/images/family/"):
            return _json({"name": self.families[(parts[1], parts[-1])]})
        if route.startswith("global/firewalls"):
            return self._firewall(request.method, parts[4] if len(parts) > 4 else None, body)
        return _json({"error": {"code": 404, "message": route}}, 404)

    def _accelerators(self, args):
        name = re.fullmatch(r'name = "(.*)"', args["filter"]).group(1)
        offering = sorted(z for z, types in self.zones.items() if name in types)
        page = int(args.get("pageToken") or 0)
        items = {}
        if offering:
            zone = offering[page]
            items[f"zones/{zone}"] = {"acceleratorTypes": [
                {"name": name, "zone": zone, "maximumCardsPerInstance": self.zones[zone][name]}]}
        reply = {"items": items}
        if page + 1 < len(offering):
            reply["nextPageToken"] = str(page + 1)
        return _json(reply)

    def _firewall(self, method, name, body):
        if method == "GET" and name is None:
            return _json({"items": list(self.firewalls.values())})
        if method == "GET":
            if name not in self.firewalls:
                return _json({"error": {"code": 404, "message": f"firewall {name} not found"}},
                             404)
            return _json(self.firewalls[name])
        if method == "POST":
            self.firewalls[body["name"]] = {
                **body, "network": f"https://www.googleapis.com/compute/v1/projects/"
                f"{self.project}/{body['network']}", "kind": "compute#firewall"}
        elif method == "PATCH":
            self.firewalls[name].update(body)
        operation = {"kind": "compute#operation", "name": "operation-1", "status": "DONE"}
        if self.operation_error:
            code, message = self.operation_error
            operation.update(httpErrorStatusCode=code, httpErrorMessage=message,
                             error={"errors": [{"code": "CONFLICT", "message": message}]})
        return _json(operation)


def _json(data, status: int = 200):
    from werkzeug import Response

    return Response(json.dumps(data), status=status, content_type="application/json")


@pytest.fixture
def compute_api(httpserver):
    return FakeComputeApi(httpserver)


@pytest.fixture(scope="session")
def httpserver_listen_address():
    return ("127.0.0.1", 0)


@pytest.fixture(scope="module")
def oci_key():
    """A throwaway API signing key: the OCI SDK signs every request with it for real."""
    from tests.infra.oci_fake import ApiKey

    return ApiKey.generate()


@pytest.fixture
def oci_fake(oci_key):
    """The loopback fake of the OCI APIs, checking each request's signature against
    ``oci_key``."""
    from tests.infra.oci_fake import running_fake

    with running_fake(oci_key) as fake:
        yield fake
