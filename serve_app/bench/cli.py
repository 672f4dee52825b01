"""The benchmark MariTalk Local users know, against any OpenAI or MariTalk-compatible server.

    python -m serve_app.bench --concurrency 1,2,4,8 --n-repeats 5 --prompt-size 550 --max-tokens 150

Tables aggregate as MariTalk Local's tool did (see ``serve_app.bench.loadgen`` for the rates); CSV, JSON and a
PNG chart go to ``--out``. Needs the ``bench`` extra: ``pip install 'serve-app[bench]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serve_app.bench.loadgen import (
    RequestResult,
    build_prompts,
    per_request_rates,
    run_bench,
    summary,
    system_tokens,
)

BENCH_EXTRA = ("tqdm", "pandas", "matplotlib")


def missing_bench_modules() -> list[str]:
    return [m for m in BENCH_EXTRA if importlib.util.find_spec(m) is None]


def tables(results: list[RequestResult]) -> tuple[Any, Any]:
    """MariTalk Local's two tables, as pandas frames."""
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
                   "serve_app_router, serve_app_front_door, serve_app_baseline, ray_serve_llm, "
                   "ray_serve_llm_haproxy (serve_app.bench.compare.contender_command says what "
                   "each is)")
    p.add_argument("--baseline-tree", metavar="PATH",
                   help="with --compare: the checkout serve_app_baseline runs from")
    p.add_argument("--roofline", action="store_true",
                   help="read bandwidth, bytes per decode step, c=1 decode and higher "
                   "concurrency against their bounds, in one run (bench.roofline)")
    p.add_argument("--variants", action="append", default=[],
                   help="with --roofline: this app again with more environment, "
                   "LABEL:KEY=VALUE,KEY=VALUE (repeatable), e.g. the settings before a change")
    p.add_argument("--dtype", default="auto",
                   help="with --roofline: the app's dtype setting (a variant's SERVE_APP_DTYPE "
                   "wins); bytes per step follow the dtype the engine runs")
    p.add_argument("--probe-dtype",
                   help="with --roofline: dtype of the FLOP-rate probe (default: float32 on CPU, "
                   "bfloat16 on a GPU)")
    return p


def load_tokenizer(path: str | None) -> Any:
    from transformers import AutoTokenizer

    from serve_app.config import DEFAULT_CACHE_DIR, DEFAULT_MODEL_SOURCE
    from serve_app.weights import resolve_model

    return AutoTokenizer.from_pretrained(path or resolve_model(DEFAULT_MODEL_SOURCE,
                                                                  DEFAULT_CACHE_DIR))


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    missing = missing_bench_modules()
    if missing:
        raise SystemExit(f"The benchmark needs {', '.join(missing)}: "
                         "pip install 'serve-app[bench]'")
    if args.roofline:
        from serve_app.bench.roofline import roofline

        roofline(args)
        return
    if args.compare:
        from serve_app.bench.compare import compare

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

