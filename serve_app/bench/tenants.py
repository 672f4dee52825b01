"""Many teams on one deployment, measured: ``python -m serve_app.bench.tenants``.

Three measurements on the real stack (``python -m serve_app`` with vLLM and the model), each
side by side in one run, printed with the box's load average:

- **overshoot**: one key limited to ``--rpm`` requests (then ``--tpm`` tokens) a minute, hammered
  by ``--clients`` clients through two replicas on one port for ``--seconds``; what was admitted
  against the limit's bound, ``limit * (1 + T / 60)`` (a full minute's bucket, then its rate),
  and the admitted rate after the first minute against the limit's rate.
- **affinity**: multi-turn conversations on the same two replicas, each turn a new connection
  (the kernel picks the replica), alternately with a session id (the replicas relay each
  session to its owner, whose prefix cache holds the conversation) and without; median TTFT of
  turns 2-6 of each.
- **fairness**: one key alone at c=1, then the same beside another key flooding at c=32, on one
  replica with the fair queue (``--fair-slots``) and, unless ``--no-baseline``, on one without it;
  the quiet key's median latency with and without the flood.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import psutil

from serve_app.bench.loadgen import FILLER
from serve_app.config import TELEMETRY_OFF_ENV
from serve_app.tenants import KeyStore

NAME = "bench-model"


# -- pure aggregation --------------------------------------------------------------------------


def overshoot(admitted_at: list[float], limit_per_min: float, seconds: float) -> dict[str, float]:
    """``admitted_at``: seconds since the start at which each unit (request, token) was
    admitted. The bound is one minute's bucket plus the rate; the steady rate is measured after
    the first minute (when the bucket's start is spent)."""
    bound = limit_per_min * (1 + seconds / 60)
    total = len(admitted_at)
    steady = [t for t in admitted_at if t >= 60]
    out = {"admitted": total, "bound": bound, "over_bound": total / bound - 1}
    if seconds > 60:
        rate = len(steady) / (seconds - 60)
        out.update(steady_rate_per_min=rate * 60, over_rate=rate * 60 / limit_per_min - 1)
    return out


def ratio(a: list[float], b: list[float]) -> float:
    return median(a) / median(b) if a and b and median(b) > 0 else float("nan")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- the stack ---------------------------------------------------------------------------------


class Stack:
    """``python -m serve_app`` on a loopback port with a key store of its own and ``keys``
    created before it starts; ``env``: more SERVE_APP_* settings."""

    def __init__(self, out: Path, name: str, port: int, keys: dict[str, dict[str, Any]],
                 env: dict[str, str], model: str | None, eager: bool) -> None:
        self.url = f"http://127.0.0.1:{port}"
        data = out / name
        data.mkdir(parents=True, exist_ok=True)
        store_path = data / "api_keys.db"
        store_path.unlink(missing_ok=True)
        store = KeyStore(store_path).start()
        self.keys = {k: store.create(k, **limits) for k, limits in keys.items()}
        store.close()
        cmd = [sys.executable, "-m", "serve_app", "--port", str(port)]
        if eager:
            cmd.append("--enforce-eager")
        if model:
            cmd += ["--model", model]
        # A Ray temp dir of its own (short: it holds Unix sockets), apart from other Rays here.
        full_env = {**os.environ, **TELEMETRY_OFF_ENV, "SERVE_APP_MODEL_NAME": NAME,
                    "SERVE_APP_KEY_STORE_PATH": str(store_path),
                    "RAY_TMPDIR": tempfile.mkdtemp(prefix="rb", dir="/tmp"), **env}
        self.log = open(data / "stack.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def headers(self, key: str, session: str | None = None) -> dict[str, str]:
        out = {"Authorization": f"Bearer {self.keys[key]}"}
        if session:
            out["X-Session-Id"] = session
        return out

    def wait(self, key: str, timeout_s: float = 1800) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the stack exited ({self.proc.returncode}): {self.log.name}")
            try:
                resp = httpx.post(f"{self.url}/v1/completions", headers=self.headers(key),
                                  json={"model": NAME, "prompt": "Hi", "max_tokens": 1},
                                  timeout=60)
                if resp.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not start: {self.log.name}")
            time.sleep(2)

    def stop(self) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        self.log.close()


# -- overshoot -----------------------------------------------------------------------------------


async def hammer(stack: Stack, key: str, clients: int, seconds: float, max_tokens: int,
                 count_tokens: bool) -> tuple[list[float], int]:
    """``clients`` closed loops, each on a connection of its own (the kernel spreads them over
    the replicas), pausing briefly after a 429. Returns the admission times of each request (or
    of each token, by vLLM's usage) and the number of 429s."""
    admitted: list[float] = []
    refused = 0
    start = time.monotonic()

    async def client() -> None:
        nonlocal refused
        async with httpx.AsyncClient(timeout=120, headers=stack.headers(key)) as http:
            while (sent := time.monotonic()) - start < seconds:
                try:
                    resp = await http.post(f"{stack.url}/v1/completions", json={
                        "model": NAME, "prompt": "Count: one, two,", "max_tokens": max_tokens,
                        "ignore_eos": True})
                except httpx.HTTPError:
                    continue
                if resp.status_code == 200:
                    n = resp.json()["usage"]["total_tokens"] if count_tokens else 1
                    admitted.extend([sent - start] * n)
                elif resp.status_code == 429:
                    refused += 1
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(client() for _ in range(clients)))
    return admitted, refused


# -- affinity ------------------------------------------------------------------------------------


def context(rng: random.Random, words: int) -> str:
    tag = "".join(rng.choices(string.ascii_lowercase, k=12))
    return f"[{tag}] " + " ".join((FILLER * (words // 40 + 2)).split()[:words])


async def conversation(stack: Stack, key: str, session: str | None, system: str, turns: int,
                       max_tokens: int) -> list[float]:
    """TTFT of each turn; every turn on a new connection."""
    messages = [{"role": "system", "content": system}]
    ttfts = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn + 1}: summarise that in "
                         "one sentence, differently from before."})
        answer = []
        async with httpx.AsyncClient(timeout=600) as http:
            start = time.perf_counter()
            first = None
            async with http.stream("POST", f"{stack.url}/v1/chat/completions",
                                   headers=stack.headers(key, session), json={
                                       "model": NAME, "messages": messages, "stream": True,
                                       "max_tokens": max_tokens, "temperature": 0}) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    for choice in json.loads(line[6:]).get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            first = first or time.perf_counter()
                            answer.append(piece)
        ttfts.append((first or time.perf_counter()) - start)
        messages.append({"role": "assistant", "content": "".join(answer)})
    return ttfts


# -- fairness ------------------------------------------------------------------------------------


async def quiet_latencies(stack: Stack, n: int, prompt: str, max_tokens: int) -> list[float]:
    out = []
    async with httpx.AsyncClient(timeout=900, headers=stack.headers("quiet")) as http:
        for _ in range(n):
            start = time.perf_counter()
            resp = await http.post(f"{stack.url}/v1/completions", json={
                "model": NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
            resp.raise_for_status()
            out.append(time.perf_counter() - start)
    return out


async def with_flood(stack: Stack, n: int, prompt: str, max_tokens: int, flood: int,
                     flood_tokens: int) -> tuple[list[float], int]:
    """The quiet key's latencies while ``flood`` clients of the flood key keep one request
    each in flight; returns them and the flood's completed requests."""
    stop = asyncio.Event()
    done = 0
    running = 0

    async def flooder() -> None:
        nonlocal done, running
        async with httpx.AsyncClient(timeout=900, headers=stack.headers("flood")) as http:
            while not stop.is_set():
                running += 1
                try:
                    resp = await http.post(f"{stack.url}/v1/completions", json={
                        "model": NAME, "prompt": prompt, "max_tokens": flood_tokens,
                        "ignore_eos": True})
                    done += resp.status_code == 200
                except httpx.HTTPError:
                    pass
                finally:
                    running -= 1

    tasks = [asyncio.create_task(flooder()) for _ in range(flood)]
    while running < flood:  # every flood client has its request out
        await asyncio.sleep(0.1)
    await asyncio.sleep(2)  # and the engine holds them
    latencies = await quiet_latencies(stack, n, prompt, max_tokens)
    stop.set()
    await asyncio.gather(*tasks)
    return latencies, done


# -- the run -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve_app.bench.tenants",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="overshoot,affinity,fairness")
    parser.add_argument("--model", help="model source (default: the embedded SmolLM2)")
    parser.add_argument("--compiled", action="store_true", help="vLLM compiled (default eager: "
                        "the stacks start 3x faster; ratios are what is measured)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench-tenants"))
    parser.add_argument("--port", type=int, default=19400)
    parser.add_argument("--rpm", type=int, default=30)
    parser.add_argument("--tpm", type=int, default=400)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--context-words", type=int, default=400)
    parser.add_argument("--fair-slots", type=int, default=4)
    parser.add_argument("--quiet-requests", type=int, default=6)
    parser.add_argument("--quiet-tokens", type=int, default=32)
    parser.add_argument("--flood", type=int, default=32)
    parser.add_argument("--flood-tokens", type=int, default=64)
    parser.add_argument("--no-baseline", action="store_true")
    ns = parser.parse_args(argv)
    parts = {p.strip() for p in ns.parts.split(",")}
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": vars(ns), "load_start": load_average()}
    eager = not ns.compiled
    if parts & {"overshoot", "affinity"}:
        stack = Stack(out, "two-replicas", ns.port, {
            "limited-rpm": {"rpm": ns.rpm}, "limited-tpm": {"tpm": ns.tpm}, "chat": {}},
            {"SERVE_APP_MIN_REPLICAS": "2", "SERVE_APP_MAX_REPLICAS": "2"}, ns.model, eager)
        try:
            stack.wait("chat")
            if "overshoot" in parts:
                results["overshoot"] = run_overshoot(stack, ns)
            if "affinity" in parts:
                results["affinity"] = run_affinity(stack, ns)
        finally:
            stack.stop()
    if "fairness" in parts:
        results["fairness"] = run_fairness(out, ns, eager)
    results["load_end"] = load_average()
    path = out / "tenants.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nload average at start {results['load_start']}, at end {results['load_end']}; "
          f"wrote {path}")


def run_overshoot(stack: Stack, ns: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for kind, key, limit, tokens in (("requests", "limited-rpm", ns.rpm, 1),
                                     ("tokens", "limited-tpm", ns.tpm, 8)):
        load = load_average()
        admitted, refused = asyncio.run(hammer(stack, key, ns.clients, ns.seconds, tokens,
                                               count_tokens=kind == "tokens"))
        row = {**overshoot(admitted, limit, ns.seconds), "refused": refused, "load": load}
        out[kind] = row
        print(f"overshoot, {kind}/min limit {limit}, 2 replicas, {ns.clients} clients, "
              f"{ns.seconds:.0f} s (load {load}): admitted {row['admitted']} against a bound of "
              f"{row['bound']:.0f} ({row['over_bound']:+.1%}); after the first minute "
              f"{row.get('steady_rate_per_min', 0):.1f}/min ({row.get('over_rate', 0):+.1%}); "
              f"{refused} refused with 429", flush=True)
    return out


def run_affinity(stack: Stack, ns: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(0)
    load = load_average()
    ttft: dict[str, list[list[float]]] = {"affinity": [], "none": []}
    for i in range(ns.conversations):
        for mode in ("affinity", "none") if i % 2 == 0 else ("none", "affinity"):
            session = f"bench-{i}-{mode}" if mode == "affinity" else None
            ttft[mode].append(asyncio.run(conversation(
                stack, "chat", session, context(rng, ns.context_words), ns.turns, 16)))
    later = {m: [t for conv in runs for t in conv[1:]] for m, runs in ttft.items()}
    first = {m: [conv[0] for conv in runs] for m, runs in ttft.items()}
    row = {"load": load, "ttft": ttft,
           "median_ttft_later_turns": {m: median(v) for m, v in later.items()},
           "median_ttft_first_turn": {m: median(v) for m, v in first.items()},
           "ratio_later_turns": ratio(later["affinity"], later["none"])}
    print(f"affinity, 2 replicas, {ns.conversations} conversations x {ns.turns} turns each way "
          f"(load {load}): median TTFT of turns 2-{ns.turns}: with a session "
          f"{row['median_ttft_later_turns']['affinity'] * 1000:.0f} ms, without "
          f"{row['median_ttft_later_turns']['none'] * 1000:.0f} ms (ratio "
          f"{row['ratio_later_turns']:.2f}); turn 1: "
          f"{row['median_ttft_first_turn']['affinity'] * 1000:.0f} / "
          f"{row['median_ttft_first_turn']['none'] * 1000:.0f} ms", flush=True)
    return row


def run_fairness(out: Path, ns: argparse.Namespace, eager: bool) -> dict[str, Any]:
    prompt = context(random.Random(1), 60)
    results = {}
    setups = [("fair", {"SERVE_APP_FAIR_SLOTS": str(ns.fair_slots)})]
    if not ns.no_baseline:
        setups.append(("unfair", {}))
    for i, (name, env) in enumerate(setups):
        stack = Stack(out, f"fairness-{name}", ns.port + 1 + i, {"quiet": {}, "flood": {}},
                      env, ns.model, eager)
        try:
            stack.wait("quiet")
            load = load_average()
            alone = asyncio.run(quiet_latencies(stack, ns.quiet_requests, prompt,
                                                ns.quiet_tokens))
            flooded, flood_done = asyncio.run(with_flood(
                stack, ns.quiet_requests, prompt, ns.quiet_tokens, ns.flood, ns.flood_tokens))
        finally:
            stack.stop()
        row = {"load": load, "alone": alone, "with_flood": flooded,
               "flood_completed": flood_done, "ratio": ratio(flooded, alone)}
        results[name] = row
        slots = f"fair_slots {ns.fair_slots}" if name == "fair" else "no fair queue"
        print(f"fairness, 1 replica, {slots} (load {load}): the quiet key's median latency "
              f"alone {median(alone):.2f} s, beside a c={ns.flood} flood {median(flooded):.2f} s "
              f"(ratio {row['ratio']:.2f}); the flood completed {flood_done} requests meanwhile",
              flush=True)
    return results


if __name__ == "__main__":
    main()
