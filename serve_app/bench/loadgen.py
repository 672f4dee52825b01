"""The benchmark's load generator and its pure aggregation, shared by ``serve_app.bench.cli`` (one
server) and ``serve_app.bench.compare`` (several, side by side).

Per request: generated_tps = generated tokens / decode time (first to last token) and
total_tps = (prompt + generated tokens) / client wall time. Per burst (``concurrency`` requests
sent at once): system tokens = the burst's prompt + generated tokens / the burst's median request
time.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import time
from dataclasses import dataclass
from statistics import median
from typing import Any

import httpx

FILLER = (
    "The history of science is the study of the development of science and scientific "
    "knowledge, including both the natural and social sciences. Science is a body of empirical, "
    "theoretical, and practical knowledge about the natural world, produced by scientists who "
    "emphasize the observation, explanation, and prediction of real-world phenomena. "
)


@dataclass
class RequestResult:
    concurrency: int
    repeat: int
    prompt_tokens: int
    generated_tokens: int
    ttft: float  # seconds to the first generated text (wall time when not streaming)
    decode_time: float  # first to last token
    wall: float
    error: str | None = None


# -- prompts ---------------------------------------------------------------------------------


def build_prompts(n: int, size: int, tokenizer: Any, *, unique: bool, seed: int = 0) -> list[str]:
    """``n`` prompts of ``size`` tokens. With ``unique`` each starts with a random prefix so
    vLLM's prefix cache cannot serve one request from another's work."""
    rng = random.Random(seed)
    ids = tokenizer.encode(FILLER * (size // 40 + 2), add_special_tokens=False)
    prompts = []
    for _ in range(n):
        prefix = "".join(rng.choices(string.ascii_lowercase, k=12)) + ": " if unique else ""
        head = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
        body = ids[: max(1, size - len(head))]
        prompts.append(prefix + tokenizer.decode(body))
    return prompts


# -- one request -------------------------------------------------------------------------------


async def openai_request(
    client: httpx.AsyncClient, url: str, model: str | None, prompt: str, max_tokens: int,
    stream: bool,
) -> tuple[int, int, float, float, float]:
    """(prompt_tokens, generated_tokens, ttft, decode_time, wall) via /v1/completions."""
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "ignore_eos": True, "stream": stream}
    if model:
        body["model"] = model
    start = time.perf_counter()
    if not stream:
        resp = await client.post(f"{url}/v1/completions", json=body)
        wall = time.perf_counter() - start
        resp.raise_for_status()
        usage = resp.json()["usage"]
        return usage["prompt_tokens"], usage["completion_tokens"], wall, wall, wall
    body["stream_options"] = {"include_usage": True}
    first = last = 0.0
    usage = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            # Any event with a choice carries a generated token, even when its text is empty
            # (a special token, or bytes of a character not yet complete): timing by text
            # would date the first token late on models that emit such tokens.
            if event.get("choices"):
                last = time.perf_counter()
                first = first or last
            if event.get("usage"):
                usage = event["usage"]
    wall = time.perf_counter() - start
    if usage is None:
        raise RuntimeError("the stream carried no usage")
    return (usage["prompt_tokens"], usage["completion_tokens"], (first or wall) - start,
            last - first, wall)


async def maritalk_request(
    client: httpx.AsyncClient, url: str, model: str | None, prompt: str, max_tokens: int,
    stream: bool,
) -> tuple[int, int, float, float, float]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "do_sample": False, "temperature": 0.7,
            "top_p": 0.95, "stop_sequences": [], "seed": None}
    start = time.perf_counter()
    resp = await client.post(f"{url}/generate", json=body)
    wall = time.perf_counter() - start
    resp.raise_for_status()
    data = resp.json()
    ttft = data["queue_time"] + data["prompt_time"]
    return data["prompt_tokens"], data["completion_tokens"], ttft, data["generation_time"], wall


# -- runs ------------------------------------------------------------------------------------------


async def run_bench(
    url: str,
    *,
    concurrencies: list[int],
    n_repeats: int,
    prompts: list[str],
    max_tokens: int,
    api: str = "openai",
    model: str | None = None,
    stream: bool = True,
    progress: bool = True,
    headers: dict[str, str] | None = None,
) -> list[RequestResult]:
    """Send ``n_repeats`` bursts of ``c`` simultaneous requests for each concurrency ``c``."""
    from tqdm import tqdm

    call = openai_request if api == "openai" else maritalk_request
    results: list[RequestResult] = []
    total = sum(c * n_repeats for c in concurrencies)
    limits = httpx.Limits(max_connections=max(concurrencies) + 4)
    timeout = httpx.Timeout(600.0)
    cursor = 0
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        with tqdm(total=total, disable=not progress, desc="requests", unit="req") as bar:
            for c in concurrencies:
                for r in range(n_repeats):
                    batch = [prompts[(cursor + i) % len(prompts)] for i in range(c)]
                    cursor += c

                    async def one(prompt: str, c: int = c, r: int = r) -> RequestResult:
                        try:
                            p, g, ttft, decode, wall = await call(
                                client, url, model, prompt, max_tokens, stream)
                            return RequestResult(c, r, p, g, ttft, decode, wall)
                        except Exception as exc:  # recorded, not fatal: a bench reports errors
                            return RequestResult(c, r, 0, 0, 0.0, 0.0, 0.0, error=repr(exc)[:300])
                        finally:
                            bar.update(1)

                    results += await asyncio.gather(*(one(p) for p in batch))
    return results


# -- aggregation (pure) ----------------------------------------------------------------------------


def per_request_rates(r: RequestResult) -> tuple[float, float]:
    generated_tps = r.generated_tokens / r.decode_time if r.decode_time > 0 else 0.0
    total_tps = (r.prompt_tokens + r.generated_tokens) / r.wall if r.wall > 0 else 0.0
    return generated_tps, total_tps


def system_tokens(results: list[RequestResult]) -> dict[tuple[int, int], float]:
    """Per (concurrency, repeat) burst: all its tokens / its median request time."""
    bursts: dict[tuple[int, int], list[RequestResult]] = {}
    for r in results:
        if r.error is None:
            bursts.setdefault((r.concurrency, r.repeat), []).append(r)
    return {
        key: sum(r.prompt_tokens + r.generated_tokens for r in rs) / median(r.wall for r in rs)
        for key, rs in bursts.items()
    }


def summary(results: list[RequestResult]) -> dict[int, dict[str, float]]:
    """Per concurrency: system tok/s (median), TTFT p50, per-request generated tok/s, errors."""
    sys_tps = system_tokens(results)
    out: dict[int, dict[str, float]] = {}
    for c in sorted({r.concurrency for r in results}):
        rs = [r for r in results if r.concurrency == c and r.error is None]
        bursts = [v for (cc, _), v in sys_tps.items() if cc == c]
        out[c] = {
            "system_tps": median(bursts) if bursts else 0.0,
            "ttft_p50": median(r.ttft for r in rs) if rs else 0.0,
            "generated_tps": median(per_request_rates(r)[0] for r in rs) if rs else 0.0,
            "errors": float(sum(1 for r in results if r.concurrency == c and r.error)),
        }
    return out
