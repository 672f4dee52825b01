"""moto's S3 server on loopback, and a TCP proxy in front of it that logs, holds and cuts.

The proxy sees every request boto3 sends (method, path, Range), can hold ranged GETs until
several are in flight at once (so a test proves parallelism instead of hoping for it), and can
cut a response mid-body, as a lost connection would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from serve_app.weights.fetch import MiB, Tuning
from serve_app.weights.s3 import S3Options, make_s3_client

# Small parts, so that a few MiB make several ranged GETs.
SMALL = Tuning(part_bytes=MiB, concurrency=4, attempts=3, record_every=256 * 1024,
               progress_every_s=0.0)
FAKE_KEYS = {"access_key_id": "testing", "secret_access_key": "testing-secret"}


@dataclass
class Seen:
    method: str
    path: str
    range: str | None

    @property
    def range_start(self) -> int | None:
        return int(self.range[6:].split("-")[0]) if self.range else None


class CuttingProxy:
    """Forwards each connection to ``upstream``, one request per connection."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.seen: list[Seen] = []
        self.in_flight = self.max_in_flight = 0
        # cut(seen) -> bytes of the response to forward before closing, or None to forward all.
        self.cut: Callable[[Seen], int | None] = lambda seen: None
        # hold(seen) -> True while the request must wait; checked again whenever another
        # request arrives, and given up after hold_timeout_s.
        self.hold: Callable[[Seen], bool] = lambda seen: False
        self.hold_timeout_s = 10.0
        self._cond = threading.Condition()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gets(self, key_suffix: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and s.path.split("?")[0]
                .endswith(key_suffix)]

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept() and makes new connections fail;
        # close() alone would leave the kernel's socket listening for it.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as upstream:
            head, body = _read_head(client)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            seen = Seen(method, path, headers.get("range"))
            length = int(headers.get("content-length", 0))
            while len(body) < length:
                body += client.recv(length - len(body))
            kept = [line for line in lines if not line.lower().startswith("connection:")]
            request = "\r\n".join(kept[:-2] + ["Connection: close", "", ""]).encode("latin-1")
            with self._cond:
                self.seen.append(seen)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self.hold(seen), timeout=self.hold_timeout_s)
                limit = self.cut(seen)
            try:
                upstream.sendall(request + body)
                sent = 0
                while data := upstream.recv(65536):
                    if limit is not None and sent + len(data) >= limit:
                        client.sendall(data[: limit - sent])
                        client.shutdown(socket.SHUT_RDWR)
                        return
                    client.sendall(data)
                    sent += len(data)
            finally:
                with self._cond:
                    self.in_flight -= 1


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("client closed before sending a request")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", body


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_sandbox(monkeypatch, tmp_path):
    """No credentials, config files or instance metadata of this machine reach boto3."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                 "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def proxy(moto_endpoint) -> Iterator[CuttingProxy]:
    host, port = moto_endpoint.removeprefix("http://").split(":")
    p = CuttingProxy((host, int(port)))
    yield p
    p.close()


def options(endpoint: str) -> S3Options:
    return S3Options(endpoint_url=endpoint, region="us-east-1", **FAKE_KEYS)


def new_bucket(endpoint: str, files: dict[str, bytes], manifest: bytes | None) -> str:
    """A fresh bucket holding ``files`` under ``model/`` (and the manifest, when given)."""
    client = make_s3_client(options(endpoint))
    bucket = f"weights-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"model/{name}", Body=data)
    if manifest is not None:
        client.put_object(Bucket=bucket, Key="model/manifest.json", Body=manifest)
    return bucket
