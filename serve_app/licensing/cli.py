"""The customer's license commands: ``python -m serve_app status`` (the license as the running
app sees it), ``python -m serve_app usage-log verify|resend|export`` (the audit of the bill, read
from the usage ledger on the head node; ``export`` writes an air-gapped installation's usage
bundle) and ``python -m serve_app license request|import`` (an air-gapped installation's
activation and leases, by file)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

from license_contract import License, LicenseError
from serve_app.licensing import airgap
from serve_app.licensing.ledger import UsageLedger
from serve_app.licensing.vendor import read_license


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


def _license(key: str | None) -> License:
    if not key:
        sys.exit("no license key: set SERVE_APP_LICENSE_KEY")
    try:
        return read_license(key, check_expiry=False)[0]
    except LicenseError as exc:
        sys.exit(f"license key: {exc}")


def license_command(argv: list[str], *, key: str | None, ledger: str, models: tuple[str, ...],
                    instances: int, gpus: float) -> int:
    """``python -m serve_app license request|import``: an air-gapped installation's activation
    request (to stdout) and the leases the vendor sends back (from a file), on the ledger of
    this (head) node."""
    parser = argparse.ArgumentParser(prog="python -m serve_app license")
    parser.add_argument("--ledger", default=ledger, help="the usage ledger (default: "
                        "SERVE_APP_LEDGER_PATH); the installation key is kept beside it")
    sub = parser.add_subparsers(dest="action", required=True)
    request = sub.add_parser("request", help="write an activation request for the vendor to "
                             "stdout (> request.json); makes this installation's key")
    request.add_argument("--models", help="comma-separated models the cluster will run "
                         f"(default: {','.join(models)})")
    request.add_argument("--instances", type=int, default=instances,
                         help=f"LLM replicas at most (default {instances})")
    request.add_argument("--gpus", type=float, default=gpus,
                         help=f"GPUs at most (default {gpus:g})")
    take = sub.add_parser("import", help="keep a lease or renewal the vendor sent (lease.json, "
                          "renewal.json); the running app serves under it within a tick")
    take.add_argument("file")
    ns = parser.parse_args(argv)
    lic = _license(key)
    path = Path(ns.ledger).expanduser()
    store = UsageLedger(path).start()
    try:
        if ns.action == "request":
            names = tuple(m.strip() for m in ns.models.split(",")) if ns.models else models
            sys.stdout.write(airgap.activation_request(
                lic, key or "", store, str(path), models=names, instances=ns.instances,
                gpus=ns.gpus, now=time.time()))
            print(f"Installation key kept in {airgap.key_path(path)} (0600); send the request "
                  "to the vendor.", file=sys.stderr)
            return 0
        lease = airgap.import_lease(lic, store, str(path), Path(ns.file).read_text(),
                                    now=time.time())
        print(f"Lease {lease.lease_id} imported: serving until {_when(lease.expires_at)} "
              f"({lease.instances if lease.instances is not None else 'any'} instances, "
              f"{lease.gpus if lease.gpus is not None else 'any'} GPUs).")
        return 0
    except airgap.AirGapError as exc:
        print(f"license {ns.action}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


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
    if data.get("air_gapped"):
        lines.append("AIR-GAPPED: this installation never dials the license server; leases and "
                     "usage travel by file.")
    if data.get("lease_warning"):
        lines.append(f"WARNING: {data['lease_warning']}")
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


def usage_log_command(argv: list[str], ledger: str, dev_ledger: str,
                      key: str | None = None) -> int:
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
    sub.add_parser("export", parents=[common], help="air-gapped: write every usage entry the "
                   "vendor has not acknowledged, signed by this installation, to stdout "
                   "(> bundle.json)")
    ns = parser.parse_args(argv)
    path = Path(ns.ledger or (dev_ledger if ns.dev_license else ledger)).expanduser()
    if not path.exists():
        print(f"No usage ledger at {path}.", file=sys.stderr)
        return 2
    store = UsageLedger(path).start()
    try:
        if ns.action == "verify":
            return _verify(store, path)
        if ns.action == "export":
            lic = _license(key)
            sys.stdout.write(airgap.export_bundle(lic, store, str(path), now=time.time()))
            return 0
        return _resend(store, ns.report_ids, ns.all, ns.wait)
    finally:
        store.close()


def _verify(ledger: UsageLedger, path: Path) -> int:
    check = ledger.verify_log()
    for problem in check.problems:
        print(f"TAMPERED: {problem}", file=sys.stderr)
    verdict = "chain intact" if check.ok else f"CHAIN BROKEN ({len(check.problems)} problems)"
    others = check.entries - check.reports
    print(f"Usage log in {path}: {check.reports} delivered reports"
          f"{f' and {others} beat, start and stop entries' if others else ''}, {verdict}; "
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
