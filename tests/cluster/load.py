"""Streams held open through the front door, from threads, until stopped: load that Serve's
autoscaler sees as in-flight requests (each replica reports its own, ``autoscaling.py``)."""

from __future__ import annotations

import json
import threading

import httpx

from tests.cluster.conftest import CHAT


class StreamLoad:
    """``n`` clients, each streaming one chat after another (``chunks`` x 0.1 s each)."""

    def __init__(self, url: str, n: int, chunks: int = 20) -> None:
        self._url = url
        self._body = {**CHAT, "stream": True, "max_tokens": chunks}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(n)]
        self._lock = threading.Lock()
        self.nodes: set[str] = set()
        self.completed = 0
        self.failures: list[str] = []

    def _client(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    with client.stream("POST", f"{self._url}/v1/chat/completions",
                                       json=self._body) as resp:
                        lines = [line for line in resp.iter_lines() if line]
                    where = json.loads(lines[0].removeprefix("data: "))
                    assert lines[-1] == "data: [DONE]", lines[-3:]
                    with self._lock:
                        self.nodes.add(where["node_id"])
                        self.completed += 1
                except Exception as exc:  # recorded; the test decides what it may tolerate
                    with self._lock:
                        self.failures.append(repr(exc)[:300])

    def __enter__(self) -> StreamLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
