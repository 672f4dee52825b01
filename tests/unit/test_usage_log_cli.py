"""``python -m serve_app usage-log verify|resend`` and the status printout, on a real ledger."""

from __future__ import annotations

import sqlite3

import pytest

from serve_app.cli import usage_log_command
from serve_app.licensing.cli import format_status
from serve_app.licensing.ledger import UsageLedger

MIDNIGHT = 1_800_057_600.0  # 2027-01-16 00:00 UTC


class Clock:
    def __init__(self) -> None:
        self.t = MIDNIGHT - 60

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ledger_path(tmp_path):
    """Two delivered reports (one across midnight), one quarantined."""
    clock = Clock()
    path = tmp_path / "ledger.db"
    led = UsageLedger(path, now=clock).start()
    led.register("a", "m", 2)
    for seconds in (30, 60, 90):
        clock.t += seconds
        led.heartbeat("a")
        (report,) = led.seal_reports("lic_1")
        if seconds == 60:
            led.quarantine(report.report_id, "HTTP 400: bad (invalid_request)")
        else:
            led.mark_delivered(report.report_id, "lic_1")
    led.close()
    return path


def test_verify_prints_usage_per_day_and_catches_tampering(ledger_path, capsys):
    assert usage_log_command(["--ledger", str(ledger_path), "verify"]) == 0
    out = capsys.readouterr().out
    assert "2 delivered reports, chain intact" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("lic_1")]
    assert rows == [["lic_1", "2027-01-15", "30.000", "0.008333", "60.000"],
                    ["lic_1", "2027-01-16", "90.000", "0.025000", "180.000"]]
    with sqlite3.connect(ledger_path) as db:
        db.execute("UPDATE usage_log SET entry = replace(entry, '\"gpus\":2', '\"gpus\":1') "
                   "WHERE seq = 2")
    assert usage_log_command(["--ledger", str(ledger_path), "verify"]) == 1
    captured = capsys.readouterr()
    assert "CHAIN BROKEN" in captured.out and "TAMPERED: entry 2" in captured.err


def test_resend_queues_a_quarantined_report_for_the_actor(ledger_path, capsys):
    led = UsageLedger(ledger_path).start()
    (q,) = led.quarantined()
    assert usage_log_command(["--ledger", str(ledger_path), "resend", "--wait", "0",
                              q["report_id"], "rep_nope"]) == 1
    out = capsys.readouterr().out
    assert f"{q['report_id']}: queued" in out and "rep_nope: no such report" in out
    assert [r.report_id for r in led.pending_reports()] == [q["report_id"]]
    led.mark_delivered(q["report_id"], "lic_1")  # what the actor does next
    assert usage_log_command(["--ledger", str(ledger_path), "resend", q["report_id"]]) == 0
    assert f"{q['report_id']}: already delivered" in capsys.readouterr().out
    assert led.verify_log().entries == 3
    led.close()


def test_status_lists_quarantined_reports_with_their_reasons():
    text = format_status({
        "license_id": "lic_1", "last_report_at": MIDNIGHT, "quarantined_reports": 1,
        "quarantined": [{"report_id": "rep_1", "seconds": 60.0, "quarantined_at": MIDNIGHT,
                         "reason": "HTTP 400: bad (invalid_request)", "intervals": 1}]})
    lines = text.splitlines()
    assert lines[1].split(None, 1) == ["last_report_at", "2027-01-16 00:00:00 UTC"]
    assert lines[3].split() == ["rep_1", "60.000", "s", "refused", "2027-01-16", "00:00:00",
                                "UTC:", "HTTP", "400:", "bad", "(invalid_request)"]
    assert "usage-log resend" in lines[4]


def test_status_says_first_that_a_development_license_is_one():
    lines = format_status({"license_id": "lic_1", "development": True}).splitlines()
    assert lines[0].startswith("DEVELOPMENT LICENSE: ")
    assert lines[-1].split() == ["development", "True"]
    assert "DEVELOPMENT" not in format_status({"license_id": "lic_1", "development": False})


@pytest.mark.parametrize("argv", [["verify", "--ledger", "{p}"], ["--ledger", "{p}", "verify"]])
def test_the_ledger_may_be_named_before_or_after_the_action(tmp_path, capsys, argv):
    missing = tmp_path / "nowhere.db"
    assert usage_log_command([a.format(p=missing) for a in argv]) == 2
    assert f"No usage ledger at {missing}" in capsys.readouterr().err
