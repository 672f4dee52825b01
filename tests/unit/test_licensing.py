"""License keys and other signed documents, read strictly; and the serving policy."""

from __future__ import annotations

import base64
import json

import pytest

from license_contract import (
    License,
    LicenseError,
    SignatureError,
    b64,
    load_public_key,
    public_key_text,
    unb64,
    verify_key,
)
from license_contract.signed import canonical
from license_server.signing import load_private_key, new_private_key, private_key_pem, signer_of
from serve_app.licensing.policy import decide
from tests.fakes import issue_key

NOW = 1_800_000_000.0
VENDOR = new_private_key()
SIGNER = signer_of(VENDOR)
LICENSE = dict(license_id="lic-1", customer="ACME", issued_at=NOW - 10, expires_at=NOW + 86400,
               server_url="http://127.0.0.1:1", grace_period_s=3600.0, heartbeat_interval_s=10.0)


def key_for(**kw) -> tuple[License, str]:
    return issue_key(VENDOR, **{**LICENSE, **kw})


def payload_of(key: str) -> dict:
    return json.loads(unb64(key.split(".")[1]))


def resign(data: dict, private_key=VENDOR) -> str:
    payload = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return f"MTL1.{b64(payload)}.{b64(private_key.sign(payload))}"


def test_round_trip_and_entitlements():
    lic, key = key_for(models=("a", "b"), max_instances=3)
    got = verify_key(key, signers={SIGNER}, now=NOW)
    assert got == lic and got.signer == SIGNER
    assert got.allows_model("a") and not got.allows_model("c")
    assert key_for(models=("*",))[0].allows_model("anything")
    assert verify_key(f"  {key}\n", now=NOW) == lic  # pasted with whitespace


@pytest.mark.parametrize("mutate, code, words", [
    (lambda k: k[:-10], "license_malformed", "truncated"),
    (lambda k: k[: len(k) // 2], "license_malformed", "truncated"),
    (lambda k: "hello", "license_malformed", "not a license key"),
    (lambda k: k.replace("MTL1", "MTL2"), "license_malformed", "not a license key"),
    (lambda k: k.split(".")[0] + ".%%%." + k.split(".")[2], "license_malformed", "garbled"),
])
def test_bad_keys_say_what_is_wrong(mutate, code, words):
    _, key = key_for()
    with pytest.raises(LicenseError) as info:
        verify_key(mutate(key), now=NOW)
    assert info.value.code == code
    assert words in str(info.value)


def test_tampered_payload_is_refused():
    _, key = key_for(max_instances=1)
    prefix, payload, sig = key.split(".")
    data = payload_of(key)
    data["max_instances"] = 1000
    forged = b64(json.dumps(data).encode())
    with pytest.raises(LicenseError) as info:
        verify_key(f"{prefix}.{forged}.{sig}", now=NOW)
    assert info.value.code == "license_invalid_signature"
    assert "altered" in str(info.value)


def test_a_key_signed_by_another_vendor_is_not_trusted_where_signers_are_named():
    _, key = issue_key(new_private_key(), **LICENSE)
    with pytest.raises(LicenseError) as info:
        verify_key(key, signers={SIGNER}, now=NOW)
    assert info.value.code == "license_untrusted_signer"
    # Swapping the named signer for the trusted one does not help: the signature is checked
    # with the key the payload names.
    data = payload_of(key)
    data["signer"] = SIGNER
    forged = f"MTL1.{b64(json.dumps(data).encode())}.{key.split('.')[2]}"
    with pytest.raises(LicenseError) as info:
        verify_key(forged, signers={SIGNER}, now=NOW)
    assert info.value.code == "license_invalid_signature"


def test_expiry():
    _, key = key_for()
    with pytest.raises(LicenseError) as info:
        verify_key(key, now=NOW + 86400)
    assert info.value.code == "license_expired"
    assert "Renew" in str(info.value)
    assert verify_key(key, now=NOW + 86400, check_expiry=False).license_id == "lic-1"


@pytest.mark.parametrize("field, value", [
    ("expires_at", float("nan")), ("expires_at", float("inf")), ("issued_at", float("-inf")),
])
def test_non_finite_numbers_are_refused_even_when_signed(field, value):
    data = {**payload_of(key_for()[1])}
    data[field] = value
    payload = json.dumps(data, sort_keys=True).encode()  # NaN/Infinity: Python's JSON extension
    key = f"MTL1.{b64(payload)}.{b64(VENDOR.sign(payload))}"
    with pytest.raises(LicenseError) as info:
        verify_key(key, now=NOW)
    assert info.value.code == "license_malformed"


@pytest.mark.parametrize("field, value", [
    ("expires_at", "1900000000"), ("max_instances", "50"), ("max_instances", 2.0),
    ("models", "abc"), ("grace_period_s", True), ("customer", 7),
])
def test_signed_values_are_not_coerced(field, value):
    data = payload_of(key_for()[1])
    data[field] = value
    with pytest.raises(LicenseError) as info:
        verify_key(resign(data), now=NOW)
    assert info.value.code == "license_malformed"


def test_base64_has_one_spelling():
    _, key = key_for()
    prefix, payload, sig = key.split(".")
    padded = f"{prefix}.{payload}{'=' * (-len(payload) % 4)}.{sig}"
    if padded != key:
        with pytest.raises(LicenseError):
            verify_key(padded, now=NOW)
    standard = base64.b64encode(unb64(payload)).decode().rstrip("=")
    if standard != payload:  # '+' and '/' instead of '-' and '_'
        with pytest.raises(LicenseError):
            verify_key(f"{prefix}.{standard}.{sig}", now=NOW)
    # The last character's unused low bits set: the same bytes, another spelling.
    raw = unb64(sig)
    assert len(raw) % 3 != 0
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig[-1])
    spare = 2 ** ((-len(sig) * 6) % 8) - 1  # bits of the last character that encode nothing
    twin = sig[:-1] + alphabet[last | spare]
    assert twin != sig and base64.urlsafe_b64decode(twin + "==") == raw
    with pytest.raises(LicenseError) as info:
        verify_key(f"{prefix}.{payload}.{twin}", now=NOW)
    assert info.value.code == "license_malformed"


SMALL_ORDER = [bytes.fromhex("01" + "00" * 31),  # the identity point
               bytes.fromhex("ec" + "ff" * 30 + "7f"),  # order 2
               bytes.fromhex("0" * 62 + "80")]  # order 4, with the sign bit


@pytest.mark.parametrize("raw", SMALL_ORDER)
def test_small_order_public_keys_are_refused(raw):
    with pytest.raises(SignatureError, match="small order"):
        load_public_key(b64(raw))
    # Under such a key a forged signature would verify: a license naming it is refused.
    data = payload_of(key_for()[1])
    data["signer"] = b64(raw)
    payload = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    forged = f"MTL1.{b64(payload)}.{b64(bytes.fromhex('01' + '00' * 31) + bytes(32))}"
    with pytest.raises(LicenseError) as info:
        verify_key(forged, now=NOW)
    assert info.value.code == "license_malformed"


def test_key_serialization():
    pem = private_key_pem(VENDOR)
    assert signer_of(load_private_key(pem)) == SIGNER
    assert len(SIGNER) == 43
    assert public_key_text(load_public_key(SIGNER)) == SIGNER
    with pytest.raises(SignatureError):
        load_public_key("not-a-key")
    lic, key = key_for()
    assert key.split(".")[1] == b64(canonical(lic))


def test_grace_arithmetic_with_an_injected_clock():
    lic, _ = key_for(grace_period_s=3600.0)
    ok = decide(lic, now=NOW, last_checkin=NOW - 3599)
    assert ok.allowed and ok.grace_left_s == pytest.approx(1)
    overdue = decide(lic, now=NOW, last_checkin=NOW - 3600)
    assert not overdue.allowed and (overdue.status, overdue.code) == (503,
                                                                      "license_checkin_overdue")
    # Never checked in: grace counts from start-up.
    assert decide(lic, now=NOW, last_checkin=None, started_at=NOW - 100).allowed
    assert not decide(lic, now=NOW, last_checkin=None, started_at=NOW - 4000).allowed
    revoked = decide(lic, now=NOW, last_checkin=NOW, revoked=True)
    assert (revoked.allowed, revoked.status, revoked.code) == (False, 403, "license_revoked")
    expired = decide(lic, now=lic.expires_at, last_checkin=NOW)
    assert (expired.status, expired.code) == (403, "license_expired")
    invalid = decide(None, now=NOW, last_checkin=None, invalid_reason="bad key")
    assert (invalid.status, invalid.code, invalid.message) == (403, "license_invalid", "bad key")
