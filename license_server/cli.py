"""``python -m license_server serve|issue|list|revoke|usage|clusters|downloads|public-key|
rotate-admin-token|publish-model|models``.

Admin commands act on the same database as the server (``LICENSE_SERVER_DATABASE_URL`` or the
SQLite file in ``LICENSE_SERVER_DATA_DIR``), so they work whether or not it is running.
``publish-model`` and ``models`` act on the vendor bucket (``LICENSE_SERVER_BUCKET__URL`` and its
siblings), the one the server presigns downloads from.

The data directory is the owner's only (0700, every file in it 0600): it holds the signing key,
the admin token and, on SQLite, the database.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from license_contract import iso
from license_server.app import IssueRequest, LicenseService, build_app, to_csv
from license_server.billing import Refusal
from license_server.catalog import ModelBucket, ModelCatalog
from license_server.crosscheck import flag_text
from license_server.db import LicenseStore
from license_server.limits import MIN_ADMIN_TOKEN_CHARS, ServerPolicy
from license_server.signing import load_private_key, new_private_key, private_key_pem


class LicenseServerSettings(BaseSettings):
    """The license server's only reader of the environment (prefix ``LICENSE_SERVER_``)."""

    model_config = SettingsConfigDict(env_prefix="LICENSE_SERVER_", extra="forbid",
                                      env_nested_delimiter="__")

    data_dir: str = Field(".data/license_server", description="Signing key, token, SQLite file.")
    database_url: str | None = Field(None, description="e.g. postgresql+psycopg://u:p@h/db")
    admin_token: str | None = Field(None, min_length=MIN_ADMIN_TOKEN_CHARS,
                                    description="Default: generated into data_dir.")
    host: str = "127.0.0.1"
    port: int = 9100
    admin_host: str = Field("127.0.0.1", description="The admin API's address, with admin_port.")
    admin_port: int | None = Field(
        None, description="The admin API's own port: the client port then serves no /admin "
        "route. None: both on the client port.")
    public_url: str | None = Field(None, description="URL put into issued keys.")
    forwarded_allow_ips: str = Field(
        "", description="Proxies whose X-Forwarded-For names the client (rate limits and the "
        "failed-login count go per client address); comma-separated, as uvicorn's "
        "--forwarded-allow-ips. Empty: none, the peer's address is the client's.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A request head not received whole within this many seconds "
        "of the connection (or of the previous answer) closes the connection.")
    keep_alive_s: float = Field(5.0, gt=0, description="Idle keep-alive connections close after.")
    limit_concurrency: int = Field(
        256, ge=1, description="Connections (and requests in progress) at once; past it, 503.")
    policy: ServerPolicy = Field(default_factory=ServerPolicy, description="Wire limits, rate "
                                 "limits, cross-checks (env LICENSE_SERVER_POLICY__<FIELD>).")
    bucket: ModelBucket | None = Field(None, description="Where published models live, for "
                                       "licensed downloads (env LICENSE_SERVER_BUCKET__<FIELD>). "
                                       "None: the server publishes no models.")

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{Path(self.data_dir).resolve() / 'licenses.db'}"


def _secret_file(path: Path, make: bytes) -> bytes:
    """Read ``path``, or create it with ``make`` readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(make)
    return make


def _sqlite_file(url: str) -> Path | None:
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _make_private(data: Path, db_file: Path | None) -> None:
    """The data directory 0700 and every file in it 0600; the SQLite file made 0600 before
    SQLite opens it (its -wal and -shm files take the database file's mode)."""
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    data.chmod(0o700)
    if db_file is not None and not db_file.exists():
        db_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(db_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    files = [f for f in data.iterdir() if f.is_file() and not f.is_symlink()]
    if db_file is not None:
        files += [p for p in (db_file, Path(f"{db_file}-wal"), Path(f"{db_file}-shm"),
                              Path(f"{db_file}-journal")) if p.exists()]
    for f in files:
        f.chmod(0o600)


def build_service(settings: LicenseServerSettings) -> tuple[LicenseService, str]:
    data = Path(settings.data_dir)
    db_file = _sqlite_file(settings.url)
    _make_private(data, db_file)
    signing_key = load_private_key(_secret_file(data / "vendor_signing_key.pem",
                                                private_key_pem(new_private_key())))
    token = settings.admin_token or _secret_file(
        data / "admin_token", secrets.token_urlsafe(32).encode()).decode().strip()
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ValueError(f"the admin token in {data / 'admin_token'} is shorter than "
                         f"{MIN_ADMIN_TOKEN_CHARS} characters: run rotate-admin-token")
    public_url = settings.public_url or f"http://{settings.host}:{settings.port}"
    store = LicenseStore(settings.url).start()
    _make_private(data, db_file)
    catalog = build_catalog(settings) if settings.bucket else None
    return LicenseService(store, signing_key, public_url, policy=settings.policy,
                          catalog=catalog), token


def uvicorn_configs(settings: LicenseServerSettings, service: LicenseService,
                    token: str) -> list[Any]:
    """The server's listeners: the client API (with the admin API, unless that has its own
    port), each with the request deadlines, the concurrency limit and the proxies trusted."""
    import uvicorn

    from license_server.listener import deadline_protocol

    proxies = [a.strip() for a in settings.forwarded_allow_ips.split(",") if a.strip()]
    common: dict[str, Any] = dict(
        log_level="warning", limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.keep_alive_s,
        http=deadline_protocol(settings.header_timeout_s,
                               settings.policy.body_timeout_s + settings.header_timeout_s),
        # uvicorn trusts 127.0.0.1 when it is given no list: no list, no proxy headers.
        proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None)
    if settings.admin_port is None:
        return [uvicorn.Config(build_app(service, token), host=settings.host,
                               port=settings.port, **common)]
    return [uvicorn.Config(build_app(service, token, listener="client"), host=settings.host,
                           port=settings.port, **common),
            uvicorn.Config(build_app(service, token, listener="admin"),
                           host=settings.admin_host, port=settings.admin_port, **common)]


def build_catalog(settings: LicenseServerSettings) -> ModelCatalog:
    if settings.bucket is None:
        sys.exit("no bucket configured: set LICENSE_SERVER_BUCKET__URL=s3://bucket/prefix "
                 "(and __ENDPOINT_URL, __REGION, __ACCESS_KEY_ID, __SECRET_ACCESS_KEY as needed)")
    return ModelCatalog(settings.bucket).start()


def rotate_admin_token(settings: LicenseServerSettings) -> str:
    """Replace the admin token file with a new random token (0600, atomically)."""
    if settings.admin_token:
        sys.exit("LICENSE_SERVER_ADMIN_TOKEN is set: rotate it where it is set, then restart")
    path = Path(settings.data_dir) / "admin_token"
    token = secrets.token_urlsafe(32)
    tmp = path.with_suffix(".new")
    tmp.unlink(missing_ok=True)
    _secret_file(tmp, token.encode())
    os.replace(tmp, path)
    return token


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m license_server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    issue = sub.add_parser("issue", help="issue a license and print its key")
    issue.add_argument("--customer", required=True)
    issue.add_argument("--days", type=float, default=30)
    issue.add_argument("--models", required=True,
                       help="comma-separated model names the license covers, or '*' for any")
    issue.add_argument("--max-instances", type=int)
    issue.add_argument("--max-gpus", type=float)
    issue.add_argument("--heartbeat-interval", type=float, default=30.0)
    issue.add_argument("--grace-hours", type=float, default=72.0)
    issue.add_argument("--json", action="store_true")
    sub.add_parser("list", help="list licenses")
    revoke = sub.add_parser("revoke", help="revoke a license")
    revoke.add_argument("license_id")
    usage = sub.add_parser("usage", help="usage per license per day, with cross-check flags")
    usage.add_argument("--license-id")
    usage.add_argument("--from", dest="day_from", metavar="YYYY-MM-DD", help="first day")
    usage.add_argument("--to", dest="day_to", metavar="YYYY-MM-DD", help="last day (included)")
    usage.add_argument("--limit", type=int, help="rows per page")
    usage.add_argument("--cursor", help="continue after this row (printed as next_cursor)")
    usage.add_argument("--offset", type=int, default=0, help="rows to skip")
    usage.add_argument("--format", choices=["json", "csv"], default="json")
    clusters = sub.add_parser("clusters", help="a license's clusters: last seen, instances, "
                              "GPUs, lease, version, development flag, stopped")
    clusters.add_argument("license_id")
    clusters.add_argument("--json", action="store_true")
    downloads = sub.add_parser("downloads", help="model downloads granted, newest first")
    downloads.add_argument("--license-id")
    downloads.add_argument("--limit", type=int, default=100, help="rows per page")
    downloads.add_argument("--before", type=int, help="continue before this id (next_before)")
    downloads.add_argument("--json", action="store_true")
    sub.add_parser("public-key", help="print the vendor public key customers configure")
    sub.add_parser("rotate-admin-token", help="write a new admin token into the data dir and "
                   "print it (restart the server to use it)")
    publish = sub.add_parser("publish-model", help="upload a model folder to the vendor bucket "
                             "and write its manifest; licenses that cover the name can download it")
    publish.add_argument("--name", required=True, help="the name licenses list, e.g. "
                         "smollm2-135m-instruct; customers use the source licensed:<name>")
    publish.add_argument("--folder", required=True, help="a Hugging Face model folder")
    sub.add_parser("models", help="list the models published in the vendor bucket")
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in (("host", getattr(args, "host", None)),
                                   ("port", getattr(args, "port", None))) if v is not None}
    settings = LicenseServerSettings(**overrides)
    if args.command in ("publish-model", "models"):  # the bucket only, not the database
        return _models_command(args, build_catalog(settings))
    if args.command == "serve":
        # Whatever the server creates from here on (SQLite's files included) is its own only.
        os.umask(0o077)
    service, token = build_service(settings)

    if args.command == "serve":
        import asyncio

        from license_server.listener import listeners, serve_all

        admin = (f"; admin API on http://{settings.admin_host}:{settings.admin_port}"
                 if settings.admin_port is not None else "")
        print(f"License server on http://{settings.host}:{settings.port}{admin} "
              f"(public key {service.public_key})", flush=True)
        asyncio.run(serve_all(listeners(uvicorn_configs(settings, service, token))))
    elif args.command == "issue":
        lic, key = service.issue(IssueRequest(
            customer=args.customer, days=args.days,
            models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
            max_instances=args.max_instances, max_gpus=args.max_gpus,
            heartbeat_interval_s=args.heartbeat_interval,
            grace_period_s=args.grace_hours * 3600))
        if args.json:
            print(json.dumps({"license": lic.model_dump(mode="json"), "key": key,
                              "public_key": service.public_key}))
        else:
            print(key)
    elif args.command == "list":
        for row in service.store.list_licenses():
            state = "revoked" if row["revoked_at"] else "active"
            print(f"{row['license_id']}  {row['customer']:<24} {state:<8} "
                  f"max_instances={row['max_instances']}")
    elif args.command == "revoke":
        if service.store.get_license(args.license_id) is None:
            sys.exit(f"no license {args.license_id}")
        service.store.revoke(args.license_id)
        print(f"revoked {args.license_id}")
    elif args.command == "usage":
        try:
            page = service.usage(args.license_id, day_from=args.day_from, day_to=args.day_to,
                                 limit=args.limit, cursor=args.cursor, offset=args.offset)
        except Refusal as exc:
            sys.exit(f"usage: {exc}")
        if args.format == "json":
            print(json.dumps(page, indent=2))
        else:
            print(to_csv(page["usage"]), end="")
            for alert in page["alerts"]:  # not CSV rows: on stderr, beside the table
                print(f"ALERT {alert['license_id']} {alert['day'] or '-'} {flag_text(alert)}",
                      file=sys.stderr)
            if page["next_cursor"]:
                print(f"next page: --cursor {page['next_cursor']}", file=sys.stderr)
    elif args.command == "clusters":
        try:
            view = service.clusters(args.license_id)
        except Refusal as exc:
            sys.exit(f"clusters: {exc}")
        if args.json:
            print(json.dumps(view, indent=2))
        else:
            _print_clusters(view["clusters"])
    elif args.command == "downloads":
        try:
            page = service.downloads(args.license_id, limit=args.limit, before=args.before)
        except Refusal as exc:
            sys.exit(f"downloads: {exc}")
        if args.json:
            print(json.dumps(page, indent=2))
        else:
            for d in page["downloads"]:
                print(f"{d['id']:>8}  {iso(d['granted_at'])}  {d['license_id']}  "
                      f"{d['cluster_id'] or '-'}  {d['model']}")
            if page["next_before"] is not None:
                print(f"next page: --before {page['next_before']}", file=sys.stderr)
    elif args.command == "public-key":
        print(service.public_key)
    elif args.command == "rotate-admin-token":
        print(rotate_admin_token(settings))


def _print_clusters(clusters: list[dict[str, Any]]) -> None:
    def when(t: float | None) -> str:
        return iso(t) if t is not None else "-"

    print(f"{'cluster':<28} {'last heartbeat':<24} {'inst':>5} {'gpus':>6}  {'lease expires':<24} "
          f"{'lease':<38} {'version':<12} dev  state")
    for c in clusters:
        state = "stopped" if c["stopped"] else "silent" if c["silent"] else "running"
        print(f"{c['cluster_id']:<28} {when(c['last_heartbeat_at']):<24} {c['instances']:>5} "
              f"{c['gpus']:>6g}  {when(c['lease_expires_at']):<24} {c['lease_id'] or '-':<38} "
              f"{c['version'] or '-':<12} {'yes' if c['development'] else 'no ':<4} {state}")


def _models_command(args: argparse.Namespace, catalog: ModelCatalog) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from license_contract import ManifestError

    where = f"s3://{catalog.bucket}/{catalog.key('')}"
    try:
        if args.command == "publish-model":
            manifest = catalog.publish(args.name, args.folder, log=print)
            print(f"published {args.name}: {len(manifest.files)} files, {manifest.total_bytes} "
                  f"bytes, under {where}/{args.name}/")
        else:
            for model in catalog.published():
                print(f"{model.name}  {len(model.manifest.files)} files  "
                      f"{model.manifest.total_bytes} bytes")
    except (BotoCoreError, ClientError, ManifestError, ValueError, OSError) as exc:
        sys.exit(f"{args.command} ({where}): {exc}")
