"""The benchmark MariTalk Local users know, against any OpenAI or MariTalk-compatible server.

    python -m serve_app.bench --concurrency 1,2,4,8 --n-repeats 5 --prompt-size 550 --max-tokens 150

Per request: generated_tps = generated tokens / decode time (first to last token) and
total_tps = (prompt + generated tokens) / client wall time. Per burst (``concurrency`` requests
sent at once): system tokens = the burst's prompt + generated tokens / the burst's median request
time. Tables aggregate as the seed's tool did; CSV, JSON and a PNG chart go to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
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


def tables(results: list[RequestResult]) -> tuple[Any, Any]:
    """The seed's two tables, as pandas frames."""
    import pandas as pd

    ok = [r for r in results if r.error is None]
    rows = [{"concurrency": r.concurrency, "generated_tps": g, "total_tps": t}
            for r in ok for g, t in [per_request_rates(r)]]
    per_request = (pd.DataFrame(rows).groupby("concurrency")[["generated_tps", "total_tps"]]
                   .agg(["mean", "median", "std"]).round(1))
    sys_rows = [{"concurrency": c, "tps": v} for (c, _), v in system_tokens(results).items()]
    system = (pd.DataFrame(sys_rows).groupby("concurrency")["tps"].agg(["median", "std"])
              .round(1).fillna(0.0))
    return per_request, system.fillna(0.0)


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


def write_outputs(results: list[RequestResult], out: Path, title: str) -> list[Path]:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([asdict(r) for r in results])
    csv_path, json_path, png_path = out / "results.csv", out / "results.json", out / "results.png"
    frame.to_csv(csv_path, index=False)
    per_request, system = tables(results)
    json_path.write_text(json.dumps({
        "title": title, "requests": [asdict(r) for r in results],
        "summary": {str(k): v for k, v in summary(results).items()},
    }, indent=2))
    plot(per_request, system, png_path, title)
    return [csv_path, json_path, png_path]


def plot(per_request: Any, system: Any, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    series = [
        (per_request["generated_tps"], "Generated tokens/s per request"),
        (per_request["total_tps"], "Total tokens/s per request"),
        (system, "System tokens/s"),
    ]
    for ax, (frame, label) in zip(axes, series, strict=True):
        x = [str(c) for c in frame.index]
        ax.bar(x, frame["median"], yerr=frame["std"].fillna(0), capsize=4, color="#3b7dd8")
        ax.set_xlabel("concurrency")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- CLI ---------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve_app.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8])
    p.add_argument("--n-repeats", type=int, default=5)
    p.add_argument("--prompt-size", type=int, default=550, help="prompt tokens")
    p.add_argument("--max-tokens", type=int, default=150, help="generated tokens per request")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the served builtin model's)")
    p.add_argument("--url", default="http://127.0.0.1:9000", help="server to measure")
    p.add_argument("--api", choices=["openai", "maritalk"], default="openai")
    p.add_argument("--model", help="`model` to send (default: the server's default)")
    p.add_argument("--api-key", help="bearer key, if the server wants one")
    p.add_argument("--no-stream", action="store_true", help="non-streaming OpenAI requests")
    p.add_argument("--same-prompt", action="store_true",
                   help="identical prompts (measures vLLM's prefix cache, not the server)")
    p.add_argument("--out", default="bench_out", help="folder for CSV, JSON and PNG")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compare", action="store_true",
                   help="start raw vLLM and this app on the same model and compare them")
    p.add_argument("--compare-model", default="builtin:smollm2-135m-instruct",
                   help="with --compare: model source for both servers, or random-1.5m")
    p.add_argument("--modes", default="stream,unary",
                   help="with --compare: stream, unary or both")
    p.add_argument("--settle-s", type=float, default=10.0,
                   help="with --compare: seconds each server idles after it answers, before load")
    p.add_argument("--enforce-eager", action="store_true",
                   help="with --compare: every contender runs vLLM eager (default: compiled)")
    p.add_argument("--contenders", default="vllm,serve_app",
                   help="with --compare: any of vllm, vllm_no_reserve, serve_app, "
                   "serve_app_licensed, serve_app_per_token, serve_app_worker_process, "
                   "serve_app_router, ray_serve_llm, ray_serve_llm_haproxy "
                   "(bench_compare.contender_command says what each is)")
    return p


def load_tokenizer(path: str | None) -> Any:
    from transformers import AutoTokenizer

    from serve_app.config import DEFAULT_CACHE_DIR, DEFAULT_MODEL_SOURCE
    from serve_app.models import resolve_model

    return AutoTokenizer.from_pretrained(path or resolve_model(DEFAULT_MODEL_SOURCE,
                                                                  DEFAULT_CACHE_DIR))


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.compare:
        from serve_app.bench_compare import compare

        compare(args)
        return
    tokenizer = load_tokenizer(args.tokenizer)
    # One fresh prompt per request: a repeated prompt is served from the prefix cache.
    # A fresh seed per run too: the server's prefix cache outlives one run of this tool.
    prompts = build_prompts(sum(args.concurrency) * args.n_repeats, args.prompt_size, tokenizer,
                            unique=not args.same_prompt, seed=random.SystemRandom().randrange(2**32))
    print(f"# {args.url} api={args.api} stream={not args.no_stream} prompt={args.prompt_size} "
          f"max_tokens={args.max_tokens} prompts={'identical' if args.same_prompt else 'random prefix'}")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    results = asyncio.run(run_bench(
        args.url, concurrencies=args.concurrency, n_repeats=args.n_repeats, prompts=prompts,
        max_tokens=args.max_tokens, api=args.api, model=args.model, stream=not args.no_stream,
        progress=not args.no_progress, headers=headers))
    errors = [r.error for r in results if r.error]
    per_request, system = tables(results)
    print(per_request.to_string())
    print("\nSystem tokens")
    print(system.to_string())
    if errors:
        print(f"\n{len(errors)} failed requests; first: {errors[0]}")
    for path in write_outputs(results, Path(args.out), f"{args.url} ({args.api})"):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
