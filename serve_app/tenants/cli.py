"""``python -m serve_app keys ...`` and ``python -m serve_app usage --by-key``: the operator's
commands, run on the head node against the key store's file.

They write the store directly, not through the running app: SQLite's locking makes the
operator's writes and the key actor's safe together, the key actor notices the new version and
every replica has it within a few seconds. So no admin route, no admin credential and no new
port exist for anyone on the network to try, Ray's cluster token is not needed, and keys can be
made before the app first starts (a server reachable from the network refuses to start without
one). Who may change keys is whoever may write the file: the head node's operator.

A new secret goes to stdout alone (``SECRET=$(python -m serve_app keys create --name x)``);
everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from serve_app.tenants.store import KeyStore, KeyStoreError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` or plain seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30d, 12h, 90m, 45s")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _limit(text: str) -> int | None:
    if text.lower() in ("none", "unlimited", "off"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (or 'none')") from None
    if value < 1:
        raise argparse.ArgumentTypeError("a limit is at least 1 ('none' for no limit)")
    return value


def _models(text: str) -> list[str]:
    return [] if text in ("", "*") else [m.strip() for m in text.split(",") if m.strip()]


def _day(text: str) -> str:
    try:
        time.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD, UTC)") from None
    return text


def _when(value: float | None) -> str:
    return "-" if value is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(value))


def _describe(key: dict[str, Any]) -> str:
    limits = [f"{key[f]} {label}" for f, label in (("rpm", "requests/min"), ("tpm", "tokens/min"),
                                                   ("max_concurrent", "concurrent"))
              if key.get(f) is not None]
    models = ", ".join(key["models"]) or "every model"
    expiry = f", expires {_when(key['expires_at'])}" if key.get("expires_at") else ""
    return f"{models}; {', '.join(limits) or 'no limits'}{expiry}"


def _store_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--store", default=default,
                        help="the key store on this (head) node (default: SERVE_APP_KEY_STORE_PATH, "
                        f"{default})")


def keys_command(argv: list[str], store: str) -> int:
    """``python -m serve_app keys create|list|revoke|rotate|update``; ``store`` is the
    configured key store's path."""
    parser = argparse.ArgumentParser(prog="python -m serve_app keys",
                                     description="Named API keys, changed live (on the head node).")
    common = argparse.ArgumentParser(add_help=False)
    _store_args(common, store)
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", parents=[common], help="a new key; prints its secret once")
    create.add_argument("--name", required=True, help="who the key is for (labels its usage)")
    create.add_argument("--models", type=_models, default=[],
                        help="comma-separated models it may use (default: every model)")
    for flag, what in (("--rpm", "requests per minute"), ("--tpm", "tokens per minute (prompt "
                       "plus completion)"), ("--max-concurrent", "requests at once")):
        create.add_argument(flag, type=_limit, help=f"limit: {what} (default: none)")
    create.add_argument("--expires", type=parse_duration, metavar="DURATION",
                        help="stops working after this long, e.g. 30d (default: never)")
    listing = sub.add_parser("list", parents=[common], help="every key (never a secret)")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    revoke = sub.add_parser("revoke", parents=[common], help="stop every secret of a key")
    revoke.add_argument("name")
    rotate = sub.add_parser("rotate", parents=[common], help="a new secret; the old one keeps "
                            "working for --grace")
    rotate.add_argument("name")
    rotate.add_argument("--grace", type=parse_duration, default=3600.0, metavar="DURATION",
                        help="how long the old secret keeps working (default 1h; 0: not at all)")
    update = sub.add_parser("update", parents=[common], help="change a key's models, limits or "
                            "expiry")
    update.add_argument("name")
    update.add_argument("--models", type=_models)
    for flag in ("--rpm", "--tpm", "--max-concurrent"):
        update.add_argument(flag, type=_limit, default=argparse.SUPPRESS,
                            help="a new limit, or 'none'")
    update.add_argument("--expires", type=parse_duration, metavar="DURATION",
                        help="from now; 0 expires it now")
    ns = parser.parse_args(argv)
    path = Path(ns.store).expanduser()
    if ns.action == "list" and not path.exists():
        print(f"No key store at {path}: no keys yet.", file=sys.stderr)
        return 0
    keys = KeyStore(path).start()
    try:
        return _run_keys(keys, ns)
    except KeyStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        keys.close()


def _run_keys(keys: KeyStore, ns: argparse.Namespace) -> int:
    err = sys.stderr
    if ns.action == "create":
        expires = None if ns.expires is None else time.time() + ns.expires
        secret = keys.create(ns.name, models=ns.models, rpm=ns.rpm, tpm=ns.tpm,
                             max_concurrent=ns.max_concurrent, expires_at=expires)
        (key,) = [k for k in keys.keys() if k["name"] == ns.name]
        print(f"Created key {ns.name!r} ({key['ids'][0]}): {_describe(key)}.\n"
              "Its secret follows, shown this once (only its hash is kept). Replicas accept it "
              "within a few seconds.", file=err)
        print(secret)
    elif ns.action == "list":
        rows = keys.keys()
        if ns.format == "json":
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'name':<24} {'state':<8} {'ids':<36} scope and limits")
        for k in rows:
            print(f"{k['name']:<24} {k['state']:<8} {' '.join(k['ids']) or '-':<36} "
                  f"{_describe(k)}")
    elif ns.action == "revoke":
        keys.revoke(ns.name)
        print(f"Revoked {ns.name!r}: replicas refuse it within a few seconds.", file=err)
    elif ns.action == "rotate":
        secret = keys.rotate(ns.name, ns.grace)
        print(f"Rotated {ns.name!r}: the new secret follows (shown this once); the old one "
              f"works until {_when(time.time() + ns.grace)}.", file=err)
        print(secret)
    else:
        changes: dict[str, Any] = {}
        for field in ("rpm", "tpm", "max_concurrent"):
            if hasattr(ns, field):
                changes[field] = getattr(ns, field)
        if ns.models is not None:
            changes["models"] = ns.models
        if ns.expires is not None:
            changes["expires_at"] = time.time() + ns.expires
        if not changes:
            print("Nothing to change: give --models, --rpm, --tpm, --max-concurrent or "
                  "--expires.", file=err)
            return 2
        keys.update(ns.name, **changes)
        (key,) = [k for k in keys.keys() if k["name"] == ns.name]
        print(f"Updated {ns.name!r}: {_describe(key)}.", file=err)
    return 0


FIELDS = ("day", "key", "model", "requests", "prompt_tokens", "completion_tokens")


def usage_command(argv: list[str], store: str) -> int:
    """``python -m serve_app usage --by-key [--from DAY] [--to DAY] [--format csv]``: requests
    and tokens per UTC day, key and model, from the key store (replicas report about once a
    second)."""
    parser = argparse.ArgumentParser(prog="python -m serve_app usage",
                                     description="Usage per key, model and UTC day: yours alone, "
                                     "never reported to the vendor.")
    parser.add_argument("--by-key", action="store_true", default=True,
                        help="per key, model and day (the only grouping, and the default)")
    parser.add_argument("--from", dest="first", type=_day, help="first day, YYYY-MM-DD (UTC)")
    parser.add_argument("--to", dest="last", type=_day, help="last day, YYYY-MM-DD (UTC)")
    parser.add_argument("--format", choices=("table", "csv"), default="table")
    _store_args(parser, store)
    ns = parser.parse_args(argv)
    path = Path(ns.store).expanduser()
    rows: list[dict[str, Any]] = []
    if path.exists():
        keys = KeyStore(path).start()
        try:
            rows = keys.usage(ns.first, ns.last)
        finally:
            keys.close()
    if ns.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return 0
    print(f"{'day':<10}  {'key':<24}  {'model':<28}  {'requests':>10}  {'prompt_tokens':>14}  "
          f"{'completion_tokens':>17}")
    for r in rows:
        print(f"{r['day']:<10}  {r['key']:<24}  {r['model']:<28}  {r['requests']:>10}  "
              f"{r['prompt_tokens']:>14}  {r['completion_tokens']:>17}")
    return 0
