from __future__ import annotations

import os

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
