"""``python -m license_server serve|issue|list|revoke|usage|public-key|rotate-admin-token|
publish-model|models``.

Admin commands act on the same database as the server (``LICENSE_SERVER_DATABASE_URL`` or the
SQLite file in ``LICENSE_SERVER_DATA_DIR``), so they work whether or not it is running.
``publish-model`` and ``models`` act on the vendor bucket (``LICENSE_SERVER_BUCKET__URL`` and its
siblings), the one the server presigns downloads from.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from license_server.app import IssueRequest, LicenseService, build_app, to_csv
from license_server.billing import Refusal
from license_server.catalog import ModelBucket, ModelCatalog
from license_server.db import LicenseStore
from license_server.limits import ServerPolicy
from license_server.signing import load_private_key, new_private_key, private_key_pem


class LicenseServerSettings(BaseSettings):
    """The license server's only reader of the environment (prefix ``LICENSE_SERVER_``)."""

    model_config = SettingsConfigDict(env_prefix="LICENSE_SERVER_", extra="forbid",
                                      env_nested_delimiter="__")

    data_dir: str = Field(".data/license_server", description="Signing key, token, SQLite file.")
    database_url: str | None = Field(None, description="e.g. postgresql+psycopg://u:p@h/db")
    admin_token: str | None = Field(None, description="Default: generated into data_dir.")
    host: str = "127.0.0.1"
    port: int = 9100
    public_url: str | None = Field(None, description="URL put into issued keys.")
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="Proxies whose X-Forwarded-For names the client (rate limits "
        "count per client address); comma-separated, as uvicorn's --forwarded-allow-ips.")
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


def build_service(settings: LicenseServerSettings) -> tuple[LicenseService, str]:
    data = Path(settings.data_dir)
    signing_key = load_private_key(_secret_file(data / "vendor_signing_key.pem",
                                                private_key_pem(new_private_key())))
    token = settings.admin_token or _secret_file(
        data / "admin_token", secrets.token_urlsafe(32).encode()).decode().strip()
    public_url = settings.public_url or f"http://{settings.host}:{settings.port}"
    store = LicenseStore(settings.url).start()
    catalog = build_catalog(settings) if settings.bucket else None
    return LicenseService(store, signing_key, public_url, policy=settings.policy,
                          catalog=catalog), token


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
    service, token = build_service(settings)

    if args.command == "serve":
        import uvicorn

        print(f"License server on http://{settings.host}:{settings.port} "
              f"(public key {service.public_key})", flush=True)
        uvicorn.run(build_app(service, token), host=settings.host, port=settings.port,
                    log_level="warning", proxy_headers=True,
                    forwarded_allow_ips=settings.forwarded_allow_ips)
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
                print(f"ALERT {alert['license_id']} {alert['cluster_id']} {alert['code']}: "
                      f"{alert['reason']}", file=sys.stderr)
            if page["next_cursor"]:
                print(f"next page: --cursor {page['next_cursor']}", file=sys.stderr)
    elif args.command == "public-key":
        print(service.public_key)
    elif args.command == "rotate-admin-token":
        print(rotate_admin_token(settings))


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
