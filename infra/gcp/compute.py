"""The one place that talks to the Compute Engine API (google-cloud-compute).

``GoogleCompute`` answers the few questions the preflight asks, in plain values; everything else
in ``infra.gcp`` is pure. ``connect`` resolves credentials and the project the way gcloud's
application-default login does, and turns each way that can fail into a ``PreflightError`` that
says what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud import compute_v1

SCOPES = ("https://www.googleapis.com/auth/compute",)


class PreflightError(Exception):
    """A check that cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Quota:
    metric: str
    limit: float
    usage: float

    @property
    def left(self) -> float:
        return self.limit - self.usage


class GoogleCompute:
    """Compute Engine reads and the firewall write, for one project.

    ``client_options`` and ``credentials`` go to every client as they are: tests point them at a
    loopback fake with anonymous credentials; in use they come from ``connect``.
    """

    def __init__(self, project: str, credentials: Any, client_options: dict | None = None) -> None:
        kwargs = {"credentials": credentials, "client_options": client_options or {}}
        self.project = project
        self._accelerators = compute_v1.AcceleratorTypesClient(**kwargs)
        self._regions = compute_v1.RegionsClient(**kwargs)
        self._firewalls = compute_v1.FirewallsClient(**kwargs)
        self._images = compute_v1.ImagesClient(**kwargs)

    def accelerator_zones(self, accelerator: str) -> dict[str, int]:
        """Zones (all regions) offering ``accelerator``, with the most one VM can take."""
        request = compute_v1.AggregatedListAcceleratorTypesRequest(
            project=self.project, filter=f'name = "{accelerator}"')
        zones = {}
        with self._errors():
            for scope, listing in self._accelerators.aggregated_list(request=request):
                for item in listing.accelerator_types:
                    if item.name == accelerator:
                        zones[scope.removeprefix("zones/")] = item.maximum_cards_per_instance
        return zones

    def region_quotas(self, region: str) -> dict[str, Quota]:
        with self._errors(f"region {region}"):
            found = self._regions.get(project=self.project, region=region)
        return {q.metric: Quota(q.metric, q.limit, q.usage) for q in found.quotas}

    def firewall(self, name: str) -> dict[str, Any] | None:
        try:
            with self._errors():
                rule = self._firewalls.get(project=self.project, firewall=name)
        except _NotFound:
            return None
        return compute_v1.Firewall.to_dict(rule, preserving_proto_field_name=False)

    def firewalls(self) -> list[dict[str, Any]]:
        """Every firewall rule of the project (all networks), in REST form."""
        with self._errors(f"firewall rules of project {self.project}"):
            return [compute_v1.Firewall.to_dict(rule, preserving_proto_field_name=False)
                    for rule in self._firewalls.list(project=self.project)]

    def insert_firewall(self, body: dict[str, Any]) -> None:
        with self._errors():
            operation = self._firewalls.insert(project=self.project,
                                               firewall_resource=_firewall(body))
            operation.result(timeout=120)

    def patch_firewall(self, name: str, body: dict[str, Any]) -> None:
        with self._errors():
            operation = self._firewalls.patch(project=self.project, firewall=name,
                                              firewall_resource=_firewall(body))
            operation.result(timeout=120)

    def image_from_family(self, project: str, family: str) -> str:
        with self._errors(f"image family {project}/{family}"):
            return self._images.get_from_family(project=project, family=family).name

    def _errors(self, what: str | None = None) -> _ApiErrors:
        return _ApiErrors(self.project, what)


def _firewall(body: dict[str, Any]) -> compute_v1.Firewall:
    """A firewall resource from its REST (camelCase) JSON form; unknown fields are errors."""
    return compute_v1.Firewall.from_json(json.dumps(body))


class _NotFound(Exception):
    pass


class _ApiErrors:
    """Maps the API's errors to messages a customer can act on."""

    def __init__(self, project: str, what: str | None) -> None:
        self.project, self.what = project, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, api_exceptions.GoogleAPICallError):
            return False
        if isinstance(exc, api_exceptions.NotFound):
            if self.what is None:
                raise _NotFound() from None
            raise PreflightError(f"{self.what} not found in project {self.project!r}: "
                                 f"{exc.message}") from None
        if isinstance(exc, (api_exceptions.Forbidden, api_exceptions.Unauthorized)):
            raise PreflightError(
                f"project {self.project!r} refused the request ({exc.message}). Check the "
                "project id, that the Compute Engine API is enabled (`gcloud services enable "
                "compute.googleapis.com`), and that your account may use it.") from None
        raise PreflightError(f"Compute Engine API error: {exc.message}") from None


def connect(project: str | None) -> GoogleCompute:
    """Application-default credentials (``gcloud auth application-default login``, or
    GOOGLE_APPLICATION_CREDENTIALS) and the project: given, or the credentials' own."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, default_project = google.auth.default(scopes=list(SCOPES))
    except DefaultCredentialsError:
        raise PreflightError(
            "No Google Cloud credentials found. Run `gcloud auth application-default login`, "
            "or set GOOGLE_APPLICATION_CREDENTIALS to a service account's key file.") from None
    project = project or default_project
    if not project:
        raise PreflightError(
            "No project: set provider.project_id in the cluster YAML, pass --project, or run "
            "`gcloud config set project PROJECT_ID`.")
    return GoogleCompute(project, credentials)
