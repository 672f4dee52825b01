"""Download throughput of a bucket source: the transfer manager (parallel ranged GETs, as the
app fetches weights) against one plain GET of the same object, side by side in one run.

    python -m serve_app.weights.bench                      # moto's S3 server on loopback
    python -m serve_app.weights.bench --endpoint URL --bucket B --key K [--region R]

Without ``--endpoint`` it starts moto on 127.0.0.1, uploads a random object (256 MiB by default)
and measures against that; moto serves from one Python process, so the numbers say more about
the client's overhead than about a real store. With ``--endpoint`` the object must already exist
(nothing is written there) and credentials come from boto3's chain (AWS_* variables, ~/.aws).
Rounds rotate the order of the methods so that none always runs first. A third row, boto3's own
``download_file`` with the same settings, separates the transfer manager from the app's writer.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from serve_app.weights.cache import CacheFolder
from serve_app.weights.fetch import MiB, Progress, RangeWriter, Tuning
from serve_app.weights.s3 import S3Options, S3Source, make_s3_client


def transfer_manager(client: Any, bucket: str, key: str, size: int, out: Path,
                     tuning: Tuning) -> None:
    """What the app does for a fresh file: S3Source.download into a .partial."""
    quiet = Tuning(progress_every_s=1e9)
    with CacheFolder.open(out.parent) as folder:
        writer = RangeWriter.create(folder, out.name, size,
                                    Progress(size, "bench", quiet, time.monotonic),
                                    tuning.record_every)
        try:
            S3Source(client, bucket, "", tuning).download(key, size, writer)
        finally:
            writer.close()


def download_file(client: Any, bucket: str, key: str, size: int, out: Path,
                  tuning: Tuning) -> None:
    """boto3's own download_file with the same transfer config: the app's writer subtracted."""
    client.download_file(bucket, key, str(out),
                         Config=S3Source(client, bucket, "", tuning).transfer_config)


def single_get(client: Any, bucket: str, key: str, size: int, out: Path,
               tuning: Tuning) -> None:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    with open(out, "wb") as f:
        for block in body.iter_chunks(MiB):
            f.write(block)


METHODS = {"transfer manager": transfer_manager, "single GET": single_get,
           "boto3 download_file": download_file}


def measure(client: Any, bucket: str, key: str, size: int, tuning: Tuning, rounds: int,
            workdir: Path) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {name: [] for name in METHODS}
    for r in range(rounds):
        order = list(METHODS)[r % len(METHODS):] + list(METHODS)[:r % len(METHODS)]
        for name in order:
            out = workdir / f"{name.replace(' ', '_')}.bin"
            start = time.perf_counter()
            METHODS[name](client, bucket, key, size, out, tuning)
            seconds[name].append(time.perf_counter() - start)
            if out.stat().st_size != size:
                raise SystemExit(f"{name}: got {out.stat().st_size} bytes, expected {size}")
            out.unlink()
            out.with_name(out.name + ".ranges").unlink(missing_ok=True)
    return seconds


def _start_moto(size: int, tuning: Tuning) -> tuple[Any, Any, str, str]:
    from boto3.s3.transfer import TransferConfig
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = make_s3_client(S3Options(endpoint_url=f"http://{host}:{port}", region="us-east-1",
                                      access_key_id="bench", secret_access_key="bench"), tuning)
    bucket, key = f"bench-{uuid.uuid4().hex[:8]}", "blob"
    client.create_bucket(Bucket=bucket)
    with tempfile.TemporaryFile() as f:
        for _ in range(0, size, 16 * MiB):
            f.write(os.urandom(min(16 * MiB, size - f.tell())))
        f.seek(0)
        client.upload_fileobj(f, bucket, key, Config=TransferConfig(
            multipart_chunksize=tuning.part_bytes, max_concurrency=tuning.concurrency))
    return server, client, bucket, key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", help="S3 endpoint URL; default: moto on loopback")
    parser.add_argument("--region")
    parser.add_argument("--bucket")
    parser.add_argument("--key")
    parser.add_argument("--size-mib", type=int, default=256, help="moto's object size")
    parser.add_argument("--part-mib", type=int, default=Tuning.part_bytes // MiB)
    parser.add_argument("--concurrency", type=int, default=Tuning.concurrency)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="where the downloads land (default: a temp folder)")
    args = parser.parse_args(argv)
    tuning = Tuning(part_bytes=args.part_mib * MiB, concurrency=args.concurrency)

    server = None
    if args.endpoint:
        if not (args.bucket and args.key):
            parser.error("--endpoint needs --bucket and --key of an existing object")
        client = make_s3_client(S3Options(endpoint_url=args.endpoint, region=args.region),
                                tuning)
        bucket, key, where = args.bucket, args.key, args.endpoint
    else:
        server, client, bucket, key = _start_moto(args.size_mib * MiB, tuning)
        where = f"{client.meta.endpoint_url} (moto, loopback)"
    try:
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        print(f"s3://{bucket}/{key}: {size / MiB:.0f} MiB at {where}")
        print(f"transfer manager: up to {tuning.concurrency} parallel ranged GETs of "
              f"{tuning.part_bytes // MiB} MiB into a .partial, as the app fetches; single GET: "
              f"one stream; {args.rounds} rounds")
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            seconds = measure(client, bucket, key, size, tuning, args.rounds, Path(tmp))
    finally:
        if server is not None:
            server.stop()
    for name, runs in seconds.items():
        rates = ", ".join(f"{size / MiB / s:.0f}" for s in runs)
        print(f"{name:>19}: median {size / MiB / statistics.median(runs):7.1f} MiB/s "
              f"(rounds: {rates} MiB/s)")
    ratio = statistics.median(seconds["single GET"]) / statistics.median(
        seconds["transfer manager"])
    print(f"transfer manager / single GET: {ratio:.2f}x (medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
