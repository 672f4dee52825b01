"""Fakes with the same protocol as the real classes they stand in for.

``FakeLLMHandle`` mimics a Serve ``DeploymentHandle`` to the LLM deployment: ``options(...)``
returns a handle bound to one method, ``.remote(...)`` returns an awaitable (unary) or an async
iterator with ``cancel()`` (streaming), exactly what ``ingress.py`` uses.

``FakeEngine`` stands in for vLLM's ``AsyncLLM`` under ``LLMServer`` (its ``engine_factory``):
the engine-client surface that ``LLMServer`` and vLLM's own OpenAI layer use, over a real
``VllmConfig`` of a tiny model folder (``write_tiny_model``) and vLLM's real renderer, with
scripted outputs. ``FakeLicenseActor`` answers ``register``/``heartbeat``/``deregister``.

``LicenseWire`` stands between the license actor and the license server app, with the server's
clock and the wire contract.

``VirtualTimeLoop`` is asyncio's loop with its clock injected: timers fire in order, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import selectors
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from license_contract import Lease, License
from license_server.signing import new_private_key, sign_lease, sign_license, signer_of
from serve_app import vllm_internals

# The vendor key of this test session. tests/conftest.py pins it for the whole session the way a
# vendor's build pins its own (a key file in serve_app/licensing/vendor_keys/), so that licenses
# it signs are real ones, as customers run them; any other key signs development licenses.
VENDOR_KEY = new_private_key()
# The rest of a heartbeat, for tests that post one by hand: a build that pins the license's
# key, with no GPUs.
BEAT = {"gpus": 0.0, "development": False, "version": "0.1.0"}


def issue_key(vendor: Any, **fields: Any) -> tuple[License, str]:
    """A license signed by ``vendor`` (an Ed25519 private key), as the license server issues one:
    any model, 30 days from now, the server's default intervals; ``fields`` override."""
    import time
    import uuid

    now = time.time()
    base: dict[str, Any] = dict(
        license_id=f"lic_{uuid.uuid4().hex[:20]}", customer="ACME", models=("*",),
        issued_at=now - 60, expires_at=now + 30 * 86400, heartbeat_interval_s=30.0,
        grace_period_s=72 * 3600.0, server_url="http://license.test", signer=signer_of(vendor))
    lic = License(**{**base, **fields})
    return lic, sign_license(lic, vendor)


T = TypeVar("T")


def issue_lease(vendor: Any, **fields: Any) -> tuple[Lease, str]:
    """A lease signed by ``vendor`` as a license server grants one at a check-in: license
    ``lic_1``, cluster ``cl_1``, a day from now; ``fields`` override."""
    import time
    import uuid

    now = time.time()
    base: dict[str, Any] = dict(
        lease_id=f"lea_{uuid.uuid4().hex}", license_id="lic_1", cluster_id="cl_1", instances=None,
        gpus=None, issued_at=now, expires_at=now + 86400, development=False,
        signer=signer_of(vendor))
    lease = Lease(**{**base, **fields})
    return lease, sign_lease(lease, vendor)


def serving_state(vendor: Any = VENDOR_KEY, **lease_fields: Any) -> dict[str, Any]:
    """The license actor's ``state`` that lets the gate serve: allowed, with a good lease."""
    lease, text = issue_lease(vendor, **lease_fields)
    return {"allowed": True, "status": 200, "code": "ok", "message": "ok", "retry_after_s": None,
            "license_id": lease.license_id, "signer": lease.signer,
            "cluster_id": lease.cluster_id, "lease": text, "server_now": lease.issued_at,
            "lease_left_s": lease.expires_at - lease.issued_at}


class FakeStream:
    def __init__(
        self,
        items: list[Any],
        *,
        fail_after: int | None = None,
        error: Exception | None = None,
    ) -> None:
        self._items = list(items)
        self._fail_after = fail_after
        self._error = error or RuntimeError("replica blew up")
        self._sent = 0
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        if self._fail_after is not None and self._sent >= self._fail_after:
            raise self._error
        if not self._items:
            raise StopAsyncIteration
        self._sent += 1
        return self._items.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class FakeLLMServer:
    """Scripted replica behaviour, recorded calls."""

    def __init__(self, name: str = "m") -> None:
        self.name = name
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.streams: list[FakeStream] = []
        self.raise_on_call: Exception | None = None
        self.ready_calls = 0
        # (prompt, completion) tokens: with it, answers carry vLLM's `usage` (streams: a final
        # usage chunk when the body asks for one with stream_options.include_usage).
        self.usage: tuple[int, int] | None = None

    def _usage(self) -> dict[str, int]:
        assert self.usage is not None
        prompt, completion = self.usage
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def openai(self, endpoint: str, body: bytes) -> tuple[int, str]:
        self.calls.append(("openai", (endpoint, body)))
        if self.raise_on_call:
            raise self.raise_on_call
        answer = {"object": endpoint, "echo": json.loads(body)}
        if self.usage is not None:
            answer["usage"] = self._usage()
        return 200, json.dumps(answer)

    def openai_stream(self, endpoint: str, body: bytes) -> FakeStream:
        self.calls.append(("openai_stream", (endpoint, body)))
        items: list[Any] = [(200, "data: {\"n\": 0}\n\n")]
        items += [f"data: {{\"n\": {i}}}\n\n" for i in range(1, 4)]
        options = json.loads(body).get("stream_options") or {}
        if self.usage is not None and options.get("include_usage"):
            items.append(f"data: {json.dumps({'choices': [], 'usage': self._usage()})}\n\n")
        items.append("data: [DONE]\n\n")
        stream = FakeStream(items)
        self.streams.append(stream)
        return stream

    async def maritalk(self, kind: str, body: bytes) -> tuple[int, str]:
        self.calls.append(("maritalk", (kind, body)))
        answer = {"output": "Paris", "queue_time": 0.0, "prompt_time": 0.1,
                  "generation_time": 0.2}
        if self.usage is not None:
            answer.update(prompt_tokens=self.usage[0], completion_tokens=self.usage[1])
        return 200, json.dumps(answer)

    async def ready(self) -> str:
        self.ready_calls += 1
        return self.name

    async def metrics_text(self) -> str:
        return f'serve_app_engine_unfinished_requests{{model_name="{self.name}"}} 0\n'


class _Call:
    def __init__(self, server: FakeLLMServer, method: str) -> None:
        self._server = server
        self._method = method

    def remote(self, *args: Any) -> Any:
        server = self._server
        if server.raise_on_call is not None and self._method == "openai_stream":
            return FakeStream([], fail_after=0, error=server.raise_on_call)
        result = getattr(server, self._method)(*args)
        return result


class FakeLLMHandle:
    def __init__(self, server: FakeLLMServer, method: str | None = None) -> None:
        self.server = server
        self._method = method

    def options(self, *, method_name: str | None = None, stream: bool = False) -> FakeLLMHandle:
        return FakeLLMHandle(self.server, method_name or self._method)

    def remote(self, *args: Any) -> Any:
        assert self._method is not None
        return _Call(self.server, self._method).remote(*args)

    def __getattr__(self, name: str) -> _Call:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Call(self.server, name)


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


# -- time ----------------------------------------------------------------------------------------


class _JumpingSelector(selectors.DefaultSelector):
    """Polls for I/O without waiting; where the loop would wait for its next timer, moves the
    loop's clock to it instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # no timer at all: only I/O (a thread's result) can wake the loop
            return super().select(None)
        self._loop.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock stands still while anything is ready to run and, once
    everything waits for a timer, jumps to it. ``asyncio.sleep``, ``wait_for`` and
    ``loop.time()`` then follow the program's own order of events: an interleaving does not
    depend on how busy the machine is, and sleeps take no real time. For code that waits on
    timers and in-memory events only (no sockets)."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


@contextlib.contextmanager
def virtual_time() -> Iterator[VirtualTimeLoop]:
    """A ``VirtualTimeLoop`` as this thread's event loop, closed as ``asyncio.run`` closes
    its own (what is still pending is cancelled first)."""
    loop = VirtualTimeLoop()
    asyncio.set_event_loop(loop)
    try:
        yield loop
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def run_in_virtual_time(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a ``VirtualTimeLoop``."""
    with virtual_time() as loop:
        return loop.run_until_complete(main)


# -- the license server's wire -------------------------------------------------------------------


class Clocks:
    """True time ``t`` (the license server's clock) and a customer host's clocks: ``wall`` is
    ``skew`` seconds off and can be stepped; ``mono`` only ever advances with true time."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t
        self.skew = 0.0
        self._mono_origin = t - 5_000.0  # any origin: monotonic time is not wall time

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t + self.skew

    def mono(self) -> float:
        return self.t - self._mono_origin

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def reboot(self) -> None:
        """The host boots again: its monotonic clock starts over (near zero)."""
        self._mono_origin = self.t - 42.0


class LicenseWire(httpx.AsyncBaseTransport):
    """The wire between the license actor and a license server app, in process.

    It can be cut (``up``), records every body sent, stamps every answer with ``X-Server-Time``
    as the server does (when given ``server_now``; ``latency`` passes on ``advance`` around
    each request), answers the next requests to a path from ``scripted`` instead of the app, and
    holds usage reports to the wire contract's interval rules (``issued_at`` given), whatever the
    server app in front of it checks. Usage reports sent with a key in ``refused_keys`` get 403,
    as from a server that no longer takes an ended license's key; ``hang`` holds every request
    unanswered."""

    def __init__(self, app: Any, *, server_now: Callable[[], float] | None = None,
                 issued_at: float | None = None, latency: float = 0.0,
                 advance: Callable[[float], None] | None = None) -> None:
        self._inner = httpx.ASGITransport(app=app)
        self.up = True
        self.sent: list[bytes] = []
        self.server_now = server_now
        self.issued_at = issued_at
        self.latency = latency
        self._advance = advance
        self.scripted: dict[str, list[httpx.Response]] = defaultdict(list)
        self.accepted: dict[str, list[dict[str, Any]]] = {}  # report id -> its intervals
        self.refused_keys: set[str] = set()
        self.hang = False
        self.keys: list[str] = []  # the key each request was sent with

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("license server unreachable")
        if self.hang:
            await asyncio.Event().wait()
        body = await request.aread()
        path = request.url.path
        self.sent.append(request.url.raw_path + b" " + body)
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.keys.append(key)
        if path == "/v1/usage" and key in self.refused_keys:
            return httpx.Response(403, json={"error": {
                "message": "this license has ended", "type": "permission_error", "param": None,
                "code": "license_expired"}})
        if self._advance and self.latency:
            self._advance(self.latency / 2)
        violation = None
        if path == "/v1/usage" and self.issued_at is not None:
            violation = self.violation(json.loads(body))
        if self.scripted[path]:
            resp = self.scripted[path].pop(0)
        elif violation:
            resp = httpx.Response(400, json={"error": {
                "message": violation, "type": "invalid_request_error", "param": "intervals",
                "code": "invalid_interval"}})
        else:
            resp = await self._inner.handle_async_request(request)
            await resp.aread()
        if path == "/v1/usage" and resp.status_code == 200:
            report = json.loads(body)
            self.accepted.setdefault(report["report_id"], report["intervals"])
        if self.server_now is not None:
            resp.headers["X-Server-Time"] = repr(self.server_now())
        else:  # a server that does not say its time: the actor keeps its own clock
            resp.headers.pop("X-Server-Time", None)
        if self._advance and self.latency:
            self._advance(self.latency / 2)
        return resp

    def violation(self, report: dict[str, Any]) -> str | None:
        """Why the contract refuses this report, or None."""
        if report["report_id"] in self.accepted:
            return None  # a replay: answered 200, counted once
        items = report["intervals"]
        if len(items) > 2000:
            return f"{len(items)} intervals in one report (at most 2000)"
        now = self.server_now() if self.server_now else float("inf")
        mine: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for it in items:
            start, end = it["start"], it["end"]
            if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
                return f"interval {start}..{end}: end must be after start"
            if end - start > 86400:
                return f"interval {start}..{end}: longer than 86400 s"
            if end > now + 300:
                return f"interval {start}..{end}: ends {end - now:.0f} s in the server's future"
            if self.issued_at is not None and start < self.issued_at - 300:
                return f"interval {start}..{end}: starts before the license was issued"
            mine[it["instance_id"]].append((start, end))
        for instance_id, spans in mine.items():
            billed = [(i["start"], i["end"]) for r in self.accepted.values() for i in r
                      if i["instance_id"] == instance_id]
            ordered = sorted(billed + spans)
            for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False):
                if start < end:
                    return f"instance {instance_id}: intervals overlap at {start}"
        return None

    def billed(self) -> float:
        return sum(i["end"] - i["start"] for r in self.accepted.values() for i in r)


# -- the engine under LLMServer ------------------------------------------------------------------

TINY_WORDS = ("<unk>", "<s>", "</s>", "user", "assistant", "system", "The", "capital", "of",
              "France", "is", "Paris", ".", "hi", "hello", "Oi")
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                      "{% if add_generation_prompt %}assistant {% endif %}")


def write_tiny_model(folder: Path, max_len: int = 4096) -> Path:
    """A Hugging Face folder vLLM builds a config and a renderer from: a one-layer Llama's
    config.json and a word-level tokenizer with a chat template. No weights: nothing loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)},
                                       unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
        "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2,
        "num_hidden_layers": 1, "vocab_size": len(TINY_WORDS), "max_position_embeddings": max_len,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", "rms_norm_eps": 1e-5}))
    return folder


@dataclass
class Script:
    """What ``FakeEngine.generate`` answers: ``words`` one output each (a stream's deltas),
    the stats vLLM would stamp, and an exception to raise after ``fail_after`` outputs."""

    words: tuple[str, ...] = ("The", " capital", " is", " Paris", ".")
    finish_reason: str = "stop"
    stamps: tuple[float, float, float, float] | None = (100.0, 100.25, 100.75, 102.0)
    error: Exception | None = None
    fail_after: int = 0


@dataclass
class Generated:
    """One ``generate`` call the engine received."""

    prompt: Any
    sampling_params: Any
    request_id: str
    kwargs: dict[str, Any] = field(default_factory=dict)


class FakeEngine:
    """vLLM's engine client (``EngineClient``/``AsyncLLM``) as ``LLMServer`` and vLLM's OpenAI
    layer use it: the config, renderer and input processor are vLLM's own; ``generate``
    follows ``script`` and records each call."""

    def __init__(self, vllm_config: Any, script: Script | None = None) -> None:
        renderer_from_config = vllm_internals.symbol("renderer_from_config")
        InputProcessor = vllm_internals.symbol("InputProcessor")

        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.renderer = renderer_from_config(vllm_config)
        self.input_processor = InputProcessor(vllm_config, self.renderer)
        self.script = script or Script()
        self.calls: list[Generated] = []
        self.aborted: list[str] = []
        self.healthy = True
        self.stopped = False
        self.output_processor = self  # vllm_internals.unfinished_requests reads it here
        self._running: set[str] = set()

    # EngineClient's state
    is_running = property(lambda self: not self.stopped)
    is_stopped = property(lambda self: self.stopped)
    errored = property(lambda self: not self.healthy)
    dead_error = property(lambda self: RuntimeError("engine dead"))

    def get_num_unfinished_requests(self) -> int:
        return len(self._running)

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def get_tokenizer(self) -> Any:
        return self.renderer.get_tokenizer()

    async def is_tracing_enabled(self) -> bool:
        return False

    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        pass

    async def abort(self, request_id: Any) -> None:
        self.aborted.append(str(request_id))

    async def check_health(self) -> None:
        if not self.healthy:
            raise self.dead_error

    def shutdown(self, timeout: float | None = None) -> None:
        self.stopped = True

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                       **kwargs: Any) -> AsyncIterator[Any]:
        """As ``AsyncLLM``: DELTA requests get one output per token, FINAL_ONLY ones the whole
        answer once; ``n`` completions each; logprobs when asked for (all tokens at -0.5)."""
        Logprob = vllm_internals.symbol("Logprob")
        CompletionOutput = vllm_internals.symbol("CompletionOutput")
        RequestOutput = vllm_internals.symbol("RequestOutput")
        RequestOutputKind = vllm_internals.symbol("RequestOutputKind")
        RequestStateStats = vllm_internals.symbol("RequestStateStats")

        self.calls.append(Generated(prompt, sampling_params, request_id, kwargs))
        script = self.script
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        delta = sampling_params.output_kind == RequestOutputKind.DELTA
        words = list(script.words)[: sampling_params.max_tokens or None]
        vocab = len(TINY_WORDS)
        tokens = [(len(TINY_WORDS) - len(words) + i) % vocab for i in range(len(words))]

        def logprobs(token_ids: list[int]) -> list[dict[int, Any]]:
            return [{t: Logprob(logprob=-0.5, rank=1, decoded_token=None)} for t in token_ids]

        prompt_logprobs = None
        if sampling_params.prompt_logprobs is not None and ids:
            prompt_logprobs = [None, *logprobs(ids[1:])]
        self._running.add(request_id)
        try:
            for i in range(len(words)):
                if script.error is not None and i == script.fail_after:
                    raise script.error
                last = i == len(words) - 1
                if not (delta or last):
                    continue
                text = words[i] if delta else "".join(words)
                token_ids = [tokens[i]] if delta else tokens
                stats = None
                if last and script.stamps is not None:
                    stats = RequestStateStats()
                    (stats.queued_ts, stats.scheduled_ts, stats.first_token_ts,
                     stats.last_token_ts) = script.stamps
                yield RequestOutput(
                    request_id=request_id, prompt=None, prompt_token_ids=ids,
                    prompt_logprobs=prompt_logprobs if (i == 0 or not delta) else None,
                    finished=last, metrics=stats,
                    outputs=[CompletionOutput(
                        index=n, text=text, token_ids=token_ids, cumulative_logprob=None,
                        logprobs=(logprobs(token_ids) if sampling_params.logprobs is not None
                                  else None),
                        finish_reason=script.finish_reason if last else None)
                        for n in range(sampling_params.n)])
                await asyncio.sleep(0)  # as a real engine, let other requests run between outputs
            if script.error is not None and script.fail_after >= len(words):
                raise script.error
        finally:
            self._running.discard(request_id)


class FakeEngineFactory:
    """``LLMServer``'s ``engine_factory``: makes ``FakeEngine``s and keeps them for the test.
    ``order`` (shared with a ``FakeLicenseActor``) records when the engine was made."""

    def __init__(self, script: Script | None = None, order: list[str] | None = None) -> None:
        self.script = script or Script()
        self.engines: list[FakeEngine] = []
        self.order = order if order is not None else []

    def __call__(self, config: Any, vllm_config: Any) -> FakeEngine:
        self.order.append("engine")
        engine = FakeEngine(vllm_config, self.script)
        self.engines.append(engine)
        return engine


class _Remote:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        return self._fn(*args)


class FakeLicenseActor:
    """The license actor's calls an ``InstanceReporter`` makes, as awaitable ``.remote``s."""

    def __init__(self, allow: bool = True, order: list[str] | None = None) -> None:
        self.allow = allow
        self.order = order if order is not None else []
        self.registered: list[tuple[str, str, float]] = []
        self.deregistered: list[str] = []
        self.register = _Remote(self._register)
        self.heartbeat = _Remote(self._heartbeat)
        self.deregister = _Remote(self.deregistered.append)

    async def _register(self, instance_id: str, model: str, gpus: float) -> dict[str, Any]:
        self.order.append("register")
        self.registered.append((instance_id, model, gpus))
        if not self.allow:
            return {"ok": False, "reason": "the license allows no more instances"}
        return {"ok": True, "heartbeat_interval_s": 3600.0}

    async def _heartbeat(self, instance_id: str, model: str, gpus: float) -> dict[str, Any]:
        return {"ok": True}
