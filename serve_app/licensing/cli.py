"""The customer's license commands: ``python -m serve_app status`` (the license as the running
app sees it) and ``python -m serve_app usage-log verify|resend`` (the audit of the bill, read
from the usage ledger on the head node)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

from serve_app.licensing.ledger import UsageLedger


def status(argv: list[str]) -> None:
    """``python -m serve_app status``: the license as the running app sees it."""
    parser = argparse.ArgumentParser(prog="python -m serve_app status")
    parser.add_argument("--url", default="http://127.0.0.1:9000")
    parser.add_argument("--api-key", help="if the app requires one")
    ns = parser.parse_args(argv)
    request = urllib.request.Request(f"{ns.url}/license")
    if ns.api_key:
        request.add_header("Authorization", f"Bearer {ns.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            data = json.load(resp)
    except OSError as exc:
        sys.exit(f"cannot reach {ns.url}: {exc}")
    print(format_status(data))


def _when(value: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


def format_status(data: dict[str, object]) -> str:
    """``GET /license`` as aligned lines; quarantined reports one per line under their count.
    A development license says so first."""
    width = max(len(k) for k in data)
    lines = []
    if data.get("development"):
        lines.append("DEVELOPMENT LICENSE: signed by a key this build does not pin; the vendor's "
                     "license server refuses it.")
    for key, value in data.items():
        if key == "quarantined" and isinstance(value, list):
            for q in value:
                lines.append(f"  {q['report_id']}  {q['seconds']:.3f} s  refused "
                             f"{_when(q['quarantined_at'])}: {q['reason']}")
            if value:
                lines.append("  (re-send one with `python -m serve_app usage-log resend ID` "
                             "once the cause is fixed)")
            continue
        if key.endswith("_at") and isinstance(value, (int, float)):
            value = _when(value)
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)


def usage_log_command(argv: list[str], ledger: str, dev_ledger: str) -> int:
    """``python -m serve_app usage-log verify|resend``: the customer's audit of the bill, read
    straight from the usage ledger on this (head) node. ``ledger`` is the configured ledger's
    path, ``dev_ledger`` that of ``python -m serve_app --dev-license``."""
    parser = argparse.ArgumentParser(prog="python -m serve_app usage-log")
    # Where the ledger is may be said before or after the action (`usage-log verify --ledger
    # X` as well as `usage-log --ledger X verify`); SUPPRESS keeps an action's parser from
    # overwriting what was said before it.
    for target, default in ((parser, None), (common := argparse.ArgumentParser(add_help=False),
                                              argparse.SUPPRESS)):
        target.add_argument("--ledger", default=default, help="the usage ledger (default: "
                            "SERVE_APP_LEDGER_PATH, or the data dir's with --dev-license)")
        target.add_argument("--dev-license", action="store_true",
                            default=default if default is not None else False,
                            help="the ledger of `python -m serve_app --dev-license`")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("verify", parents=[common], help="check the hash chain and print usage per "
                   "license and UTC day (what the vendor's GET /admin/usage shows)")
    resend = sub.add_parser("resend", parents=[common], help="offer quarantined reports to the "
                            "license server again, once the cause of the refusal is fixed")
    resend.add_argument("report_ids", nargs="*", metavar="REPORT_ID")
    resend.add_argument("--all", action="store_true", help="every quarantined report")
    resend.add_argument("--wait", type=float, default=120.0,
                        help="seconds to wait for the running app to deliver them (0: do not)")
    ns = parser.parse_args(argv)
    path = Path(ns.ledger or (dev_ledger if ns.dev_license else ledger)).expanduser()
    if not path.exists():
        print(f"No usage ledger at {path}.", file=sys.stderr)
        return 2
    store = UsageLedger(path).start()
    try:
        if ns.action == "verify":
            return _verify(store, path)
        return _resend(store, ns.report_ids, ns.all, ns.wait)
    finally:
        store.close()


def _verify(ledger: UsageLedger, path: Path) -> int:
    check = ledger.verify_log()
    for problem in check.problems:
        print(f"TAMPERED: {problem}", file=sys.stderr)
    verdict = "chain intact" if check.ok else f"CHAIN BROKEN ({len(check.problems)} problems)"
    print(f"Usage log in {path}: {check.entries} delivered reports, {verdict}; "
          f"head {check.head}")
    print(f"{'license_id':<26}  {'day':<10}  {'instance_seconds':>16}  {'instance_hours':>16}  "
          f"{'gpu_seconds':>16}")
    for row in check.days:
        print(f"{row['license_id']:<26}  {row['day']:<10}  {row['instance_seconds']:>16.3f}  "
              f"{row['instance_hours']:>16.6f}  {row['gpu_seconds']:>16.3f}")
    return 0 if check.ok else 1


def _resend(ledger: UsageLedger, report_ids: list[str], every: bool, wait_s: float) -> int:
    if every:
        report_ids = [q["report_id"] for q in ledger.quarantined()]
    if not report_ids:
        print("Nothing to re-send: name a quarantined report or pass --all. Quarantined now:")
        for q in ledger.quarantined():
            print(f"  {q['report_id']}  {q['seconds']:.3f} s  {q['reason']}")
        return 1
    waiting, outcome = [], 0
    for rid in report_ids:
        state = ledger.report_state(rid)
        if state is None:
            print(f"{rid}: no such report in this ledger")
            outcome = 1
        elif state["delivered_at"]:
            print(f"{rid}: already delivered")
        else:
            ledger.requeue(rid)  # a pending one is on its way already
            waiting.append(rid)
    deadline = time.monotonic() + wait_s
    for rid in waiting:
        while True:
            state = ledger.report_state(rid) or {}
            if state.get("delivered_at"):
                print(f"{rid}: delivered")
                break
            if state.get("quarantined_at"):
                print(f"{rid}: refused again: {state['reason']}")
                outcome = 1
                break
            if time.monotonic() >= deadline:
                print(f"{rid}: queued; the license actor delivers it at its next report "
                      "(see `python -m serve_app status`)")
                break
            time.sleep(0.5)
    return outcome
