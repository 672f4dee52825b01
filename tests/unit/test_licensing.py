from __future__ import annotations

import pytest

from license_contract import License, LicenseError, load_public_key, public_key_text, verify_key
from license_server.signing import load_private_key, new_private_key, private_key_pem, sign_license
from serve_app.licensing.policy import decide

NOW = 1_800_000_000.0
VENDOR = new_private_key()
PUBLIC = VENDOR.public_key()


def make_license(**kw) -> License:
    base = dict(license_id="lic-1", customer="ACME", issued_at=NOW - 10, expires_at=NOW + 86400,
                server_url="http://127.0.0.1:1", grace_period_s=3600, heartbeat_interval_s=10)
    return License(**{**base, **kw})


def test_round_trip_and_entitlements():
    lic = make_license(models=("a", "b"), max_instances=3)
    key = sign_license(lic, VENDOR)
    got = verify_key(key, PUBLIC, now=NOW)
    assert got == lic
    assert got.allows_model("a") and not got.allows_model("c")
    assert make_license().allows_model("anything")
    assert verify_key(f"  {key}\n", PUBLIC, now=NOW) == lic  # pasted with whitespace


@pytest.mark.parametrize("mutate, code, words", [
    (lambda k: k[:-10], "license_malformed", "truncated"),
    (lambda k: k[: len(k) // 2], "license_malformed", "truncated"),
    (lambda k: "hello", "license_malformed", "not a license key"),
    (lambda k: k.replace("MTL1", "MTL2"), "license_malformed", "not a license key"),
    (lambda k: k.split(".")[0] + ".%%%." + k.split(".")[2], "license_malformed", "garbled"),
])
def test_bad_keys_say_what_is_wrong(mutate, code, words):
    key = sign_license(make_license(), VENDOR)
    with pytest.raises(LicenseError) as info:
        verify_key(mutate(key), PUBLIC, now=NOW)
    assert info.value.code == code
    assert words in str(info.value)


def test_tampered_payload_is_refused():
    import base64
    import json

    key = sign_license(make_license(max_instances=1), VENDOR)
    prefix, payload, sig = key.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["max_instances"] = 1000
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    with pytest.raises(LicenseError) as info:
        verify_key(f"{prefix}.{forged}.{sig}", PUBLIC, now=NOW)
    assert info.value.code == "license_invalid_signature"
    assert "altered" in str(info.value)


def test_wrong_vendor_key_and_expiry():
    key = sign_license(make_license(), VENDOR)
    with pytest.raises(LicenseError) as info:
        verify_key(key, new_private_key().public_key(), now=NOW)
    assert info.value.code == "license_invalid_signature"
    with pytest.raises(LicenseError) as info:
        verify_key(key, PUBLIC, now=NOW + 86400)
    assert info.value.code == "license_expired"
    assert "Renew" in str(info.value)


def test_key_serialization():
    pem = private_key_pem(VENDOR)
    assert public_key_text(load_private_key(pem).public_key()) == public_key_text(PUBLIC)
    text = public_key_text(PUBLIC)
    assert len(text) == 43
    assert public_key_text(load_public_key(text)) == text
    with pytest.raises(LicenseError):
        load_public_key("not-a-key")


def test_grace_arithmetic_with_an_injected_clock():
    lic = make_license(grace_period_s=3600)
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
