"""The benchmark's arithmetic on fixed inputs (no server, no timing)."""

from __future__ import annotations

import json

import pytest

from serve_app.bench.cli import (
    RequestResult,
    build_prompts,
    per_request_rates,
    summary,
    system_tokens,
    tables,
    write_outputs,
)


def results():
    # concurrency 1: two bursts of one request; concurrency 2: one burst of two (+ one failure)
    return [
        RequestResult(1, 0, prompt_tokens=500, generated_tokens=100, ttft=0.5, decode_time=2.0,
                      wall=2.5),
        RequestResult(1, 1, prompt_tokens=500, generated_tokens=100, ttft=0.5, decode_time=4.0,
                      wall=5.0),
        RequestResult(2, 0, prompt_tokens=500, generated_tokens=100, ttft=1.0, decode_time=5.0,
                      wall=6.0),
        RequestResult(2, 0, prompt_tokens=500, generated_tokens=100, ttft=2.0, decode_time=8.0,
                      wall=10.0),
        RequestResult(2, 0, 0, 0, 0.0, 0.0, 0.0, error="boom"),
    ]


def test_per_request_rates():
    gen, total = per_request_rates(results()[0])
    assert gen == 50.0  # 100 tokens over 2 s of decoding
    assert total == 240.0  # 600 tokens over 2.5 s of wall time


def test_system_tokens_use_the_burst_median_request_time():
    sys_tps = system_tokens(results())
    assert sys_tps[(1, 0)] == 600 / 2.5
    assert sys_tps[(1, 1)] == 600 / 5.0
    assert sys_tps[(2, 0)] == 1200 / 8.0  # median of 6 s and 10 s; the failure is left out


def test_tables_match_the_seeds_layout():
    per_request, system = tables(results())
    assert list(per_request.columns) == [("generated_tps", "mean"), ("generated_tps", "median"),
                                         ("generated_tps", "std"), ("total_tps", "mean"),
                                         ("total_tps", "median"), ("total_tps", "std")]
    assert per_request.loc[1, ("generated_tps", "mean")] == 37.5  # (50 + 25) / 2
    assert per_request.loc[2, ("total_tps", "median")] == 80.0  # (100 + 60) / 2
    assert list(system.columns) == ["median", "std"]
    assert system.loc[1, "median"] == 180.0 and system.loc[2, "median"] == 150.0
    assert system.loc[2, "std"] == 0.0  # one burst: no spread
    text = per_request.to_string()
    assert "generated_tps" in text and "concurrency" in text


def test_summary_counts_errors_and_takes_medians():
    s = summary(results())
    assert s[1]["ttft_p50"] == 0.5 and s[2]["errors"] == 1
    assert s[2]["generated_tps"] == pytest.approx((20 + 12.5) / 2)


def test_outputs(tmp_path):
    paths = write_outputs(results(), tmp_path, "fixed")
    assert [p.name for p in paths] == ["results.csv", "results.json", "results.png"]
    assert json.loads(paths[1].read_text())["summary"]["1"]["system_tps"] == 180.0
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    assert paths[0].read_text().splitlines()[0].startswith("concurrency,repeat,prompt_tokens")


class WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


def test_prompts_have_the_size_and_random_prefixes():
    prompts = build_prompts(4, 50, WordTokenizer(), unique=True)
    assert len(set(prompts)) == 4
    assert all(len(p.split()) == 50 for p in prompts)
    same = build_prompts(4, 50, WordTokenizer(), unique=False)
    assert len(set(same)) == 1


def test_stream_timing_counts_tokens_whose_text_is_empty(monkeypatch):
    """A first token with no text yet (a special token, half a character) is still the first
    token: TTFT must not wait for the first visible text."""
    import asyncio
    from types import SimpleNamespace

    import httpx

    from serve_app.bench import loadgen
    from tests.fakes import virtual_time

    events = [{"choices": [{"text": ""}]}, {"choices": [{"text": ""}]},
              {"choices": [{"text": "hi"}]},
              {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}]

    async def body():
        for event in events:
            await asyncio.sleep(0.05)  # the server's time per event
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def handler(request):
        assert json.loads(request.content)["stream_options"] == {"include_usage": True}
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await loadgen.openai_request(client, "http://x", "m", "p", 3, True)

    with virtual_time() as loop:
        # The load generator times requests with time.perf_counter: here, the loop's clock.
        monkeypatch.setattr(loadgen, "time", SimpleNamespace(perf_counter=loop.time))
        prompt, generated, ttft, decode, wall = loop.run_until_complete(run())
    assert (prompt, generated) == (5, 3)
    assert ttft == pytest.approx(0.05)  # the first (empty-text) event, not the third
    assert decode == pytest.approx(0.10) and wall == pytest.approx(0.20)


def test_compare_contenders_differ_only_where_they_should():
    from serve_app.bench.compare import CONTENDERS, contender_command

    commands = {name: contender_command(name, "/m", 18000, "/out") for name in CONTENDERS}
    vllm, _ = commands["vllm"]
    assert vllm[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert commands["vllm_no_reserve"] == (vllm, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    ours, env = commands["serve_app"]
    assert ours[1:3] == ["-m", "serve_app"] and env == {}
    licensed, env = commands["serve_app_licensed"]
    assert licensed == ours + ["--dev-license"]
    assert env["SERVE_APP_DATA_DIR"] == "/out/licensed-data"
    assert env["SERVE_APP_LICENSE_SERVER_PORT"] == "18100"
    assert commands["serve_app_router"] == (ours, {"SERVE_APP_COLOCATE_INGRESS": "false"})
    assert commands["serve_app_front_door"] == (ours, {
        "SERVE_APP_REPLICA_HTTP": "false", "RAY_SERVE_HAPROXY_STATS_PORT": "18200",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "18300"})
    assert commands["serve_app_per_token"] == (ours + ["--stream-interval-ms", "0"], {})
    assert commands["serve_app_worker_process"] == (ours, {"SERVE_APP_CPU_INPROC_WORKER": "false"})
    assert commands["ray_serve_llm"][1] == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    assert commands["ray_serve_llm_haproxy"][1] == {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    with pytest.raises(ValueError, match="known"):
        contender_command("tgi", "/m", 1)
    # Compiled (vLLM's default and ours) unless every contender runs eager.
    assert not any("--enforce-eager" in cmd or "eager" in cmd for cmd, _ in commands.values())
    eager = {name: contender_command(name, "/m", 18000, "/out", eager=True)[0]
             for name in CONTENDERS}
    assert all(("--enforce-eager" in cmd) != (cmd[-1] == "eager") for cmd in eager.values())


def test_compare_prints_ratios_cpu_per_token_and_memory(capsys):
    from serve_app.bench.compare import cpu_per_1k, print_comparison

    row = {"system_tps": 100.0, "ttft_p50": 0.01, "generated_tps": 50.0, "errors": 0.0}
    measured = {
        "vllm": {"runs": {"stream": {1: row}}, "memory": 2 << 30,
                 "cpu": {"stream": {"cpu_s": 3.0, "generated_tokens": 1000}}},
        "serve_app": {"runs": {"stream": {1: {**row, "system_tps": 90.0}}}, "memory": 3 << 30,
                      "cpu": {"stream": {"cpu_s": 3.3, "generated_tokens": 1000}}},
    }
    assert cpu_per_1k({"cpu_s": 3.3, "generated_tokens": 1500}) == pytest.approx(2.2)
    assert cpu_per_1k({"cpu_s": 1.0, "generated_tokens": 0}) == 0.0
    print_comparison(measured, "vllm")
    out = capsys.readouterr().out
    assert "90.0 (0.90x)" in out
    assert "vllm 3.000 (1.00x), serve_app 3.300 (1.10x)" in out
    assert "serve_app:  3.00 GiB (1.50x)" in out


def test_without_the_bench_extra_the_console_script_says_which_extra(monkeypatch):
    import importlib.util

    from serve_app.bench import cli as bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pandas" else real(name, *a))
    with pytest.raises(SystemExit, match=r"needs pandas: pip install 'serve-app\[bench\]'"):
        bench.main(["--url", "http://127.0.0.1:9"])
