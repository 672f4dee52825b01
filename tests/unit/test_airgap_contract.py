"""What is carried by hand for an air-gapped installation: activation requests and usage
bundles, checked strictly (signature, installation, chain)."""

from __future__ import annotations

import hashlib
import json

import pytest

from license_contract.airgap import (
    GENESIS,
    ActivationRequest,
    BundleError,
    UsageBundle,
    UsageEntry,
    bundle_text,
    entry_hash,
    entry_text,
    open_bundle,
    open_request,
    request_text,
)
from license_contract.signed import b64, canonical, unb64
from license_server.signing import new_private_key, signer_of

INSTALLATION = new_private_key()
KEY = signer_of(INSTALLATION)


def chain(n: int, prev: str = GENESIS, start: float = 1_800_000_000.0) -> list[str]:
    texts = []
    for i in range(n):
        entry = UsageEntry(kind="report", at=start + i, license_id="lic-1", cluster_id="ins-1",
                           report_id=f"rep_{i:08d}", intervals=[
                               {"instance_id": "i1", "start": start + i - 1, "end": start + i,
                                "gpus": 0.0}], prev=prev)
        text = entry_text(entry)
        texts.append(text)
        prev = entry_hash(text)
    return texts


def bundle(entries: list[str], previous_head: str = GENESIS, signer=INSTALLATION,
           head: str | None = None) -> str:
    doc = UsageBundle(license_id="lic-1", installation_id="ins-1", previous_head=previous_head,
                      entries=tuple(entries), head=head or (entry_hash(entries[-1]) if entries
                                                            else previous_head),
                      exported_at=1_800_000_100.0, signer=signer_of(signer))
    return bundle_text(doc, signer.sign(canonical(doc)))


def test_an_honest_bundle_opens_with_its_entries_in_order():
    texts = chain(3)
    got, entries = open_bundle(bundle(texts), installation_key=KEY)
    assert [e.report_id for e in entries] == ["rep_00000000", "rep_00000001", "rep_00000002"]
    assert got.head == hashlib.sha256(texts[-1].encode()).hexdigest()
    # The next bundle chains on from this one's head.
    more = chain(2, prev=got.head, start=1_800_000_010.0)
    _, later = open_bundle(bundle(more, previous_head=got.head), installation_key=KEY)
    assert len(later) == 2
    # An empty bundle (nothing served since) is valid too.
    assert open_bundle(bundle([], previous_head=got.head), installation_key=KEY)[1] == []


@pytest.mark.parametrize("tamper, code", [
    (lambda t: t[:1] + t[2:], "bundle_chain_broken"),  # an entry removed
    (lambda t: [t[1], t[0], t[2]], "bundle_chain_broken"),  # reordered
    (lambda t: [t[0], t[1].replace('"end":1800000001.0', '"end":1800000000.5'), t[2]],
     "bundle_chain_broken"),  # altered (the next entry no longer follows it)
    (lambda t: t[:2], "bundle_chain_broken"),  # its tail cut, the head kept
])
def test_a_broken_chain_is_refused_with_where(tamper, code):
    texts = chain(3)
    head = entry_hash(texts[-1])
    with pytest.raises(BundleError) as info:
        open_bundle(bundle(tamper(texts), head=head), installation_key=KEY)
    assert info.value.code == code


def test_a_bundle_that_does_not_chain_on_from_the_acknowledged_head_is_refused():
    texts = chain(2)  # starts from GENESIS
    with pytest.raises(BundleError) as info:
        open_bundle(bundle(texts, previous_head="a" * 64), installation_key=KEY)
    assert info.value.code == "bundle_chain_broken"


def test_a_bundle_from_another_installation_is_refused():
    other = new_private_key()
    with pytest.raises(BundleError) as info:
        open_bundle(bundle(chain(1), signer=other), installation_key=KEY)
    assert info.value.code == "bundle_other_installation"


def test_an_edited_bundle_fails_its_signature():
    text = bundle(chain(2))
    prefix, payload, sig = text.split(".")
    doc = json.loads(unb64(payload))
    doc["exported_at"] += 1
    forged = f"{prefix}.{b64(json.dumps(doc, sort_keys=True, separators=(',', ':')).encode())}.{sig}"
    with pytest.raises(BundleError) as info:
        open_bundle(forged, installation_key=KEY)
    assert info.value.code == "usage_bundle_invalid_signature"


def test_an_entry_not_in_canonical_form_is_refused():
    texts = chain(1)
    spaced = json.dumps(json.loads(texts[0]), indent=1)  # same content, another spelling
    with pytest.raises(BundleError) as info:
        open_bundle(bundle([spaced], head=entry_hash(spaced)), installation_key=KEY)
    assert info.value.code == "bundle_entry_invalid"


def test_an_activation_request_proves_its_installation_key():
    request = ActivationRequest(license_id="lic-1", key_sha256="b" * 64, installation_id="ins-1",
                                models=("smollm2-135m-instruct",), instances=2, gpus=0.0,
                                created_at=1_800_000_000.0, signer=KEY)
    text = request_text(request, INSTALLATION.sign(canonical(request)))
    assert open_request(text) == request
    other = new_private_key()
    forged = request_text(request, other.sign(canonical(request)))
    with pytest.raises(BundleError):
        open_request(forged)
