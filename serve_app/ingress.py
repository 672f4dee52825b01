"""The HTTP face of the app: OpenAI and MariTalk Local routes, auth, limits, errors, metrics.

The request path touches memory and one handle call only. API keys, their limits, usage and the
fair queue per key are the ``Keyring``'s and ``FairQueue``'s (``serve_app.tenants``), held in
memory and kept current by a background round. Models are reached through
``DeploymentHandle``s injected by ``build_ingress``, or a ``LocalHandle`` for the model whose
engine lives in this very process (see ``deployments.py``); tests pass fakes with the same methods.

Every response carries ``X-Request-Id`` (the caller's, when safe, or a fresh one). Errors leave
as OpenAI's error JSON through the handlers here; a 5xx shows the client only that id, under
which its traceback is logged. Every response, refusals included, is counted by route and status
(``metrics.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from license_contract import BodyError, read_bounded
from serve_app.config import AppConfig, ModelConfig
from serve_app.errors import (
    RETRY_AFTER_S,
    AuthenticationError,
    BadRequestError,
    InternalError,
    LicenseRefusedError,
    ModelNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServeError,
    error_body,
    internal_error,
    sse_error,
    to_error_body,
    to_serve_error,
)
from serve_app.licensing import FailureLog
from serve_app.maritalk import ChatGenerateRequest, GenerateRequest
from serve_app.metrics import Metrics, MetricsMiddleware
from serve_app.request_ids import (
    RequestIdMiddleware,
    log_internal,
    request_id,
    to_stderr_too,
)
from serve_app.sessions import HOP, owner, relayed_headers, response_headers, session_of
from serve_app.tenants import (
    Admission,
    FairQueue,
    InvalidKeyError,
    KeyPolicy,
    Keyring,
    RateLimitedError,
    is_loopback,
)
from serve_app.validation import bad_request, check_generation_body, parse_json_object

if TYPE_CHECKING:
    from serve_app.licensing import LicenseGate

logger = logging.getLogger("ray.serve")

JSON = "application/json"
_MARITALK_MODELS = {"raw": GenerateRequest, "chat": ChatGenerateRequest}


class _Model:
    """A served model as the ingress sees it: its config and pre-built handle variants."""

    def __init__(self, config: ModelConfig, handle: Any, limit: int | None) -> None:
        self.config = config
        self.handle = handle
        # Requests admitted at once; None when Serve's handle queue enforces the bound.
        self.limit = limit
        self.in_flight = 0
        # Building handle options once keeps per-request work to a single .remote() call.
        self.unary = handle.options(method_name="openai")
        self.stream = handle.options(method_name="openai_stream", stream=True)
        self.maritalk = handle.options(method_name="maritalk")
        self.ready = False
        # The engine in this process (the ingress admits for it: ``limit``) runs at most
        # max_ongoing_requests at once; behind a handle, Serve spreads requests over however
        # many replicas there are, and only an explicit fair_slots bounds this ingress's share.
        local_default = config.max_ongoing_requests if limit is not None else None
        self.fair = FairQueue(config.fair_slots or local_default)


class IngressApp:
    """Builds the starlette app; holds per-process state (readiness, metrics, in-flight)."""

    def __init__(
        self,
        config: AppConfig,
        handles: Mapping[str, Any],
        *,
        license_gate: LicenseGate | None = None,
        license_status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        limits: Mapping[str, int] | None = None,
        keyring: Keyring | None = None,
        peer_transport: httpx.AsyncBaseTransport | None = None,
        readiness_retry_s: float = 1.0,
    ) -> None:
        self._config = config
        self._readiness_retry_s = readiness_retry_s
        self._gate = license_gate
        self._license_status = license_status
        limits = limits or {}
        self._models = {
            m.name: _Model(m, handles[m.name], limits.get(m.name)) for m in config.models
        }
        self._default = config.models[0].name
        # vLLM's served_model_name: a model also answers to its aliases.
        self._aliases = {n: m.name for m in config.models for n in m.served_names}
        self._keyring = keyring or Keyring(
            [k.get_secret_value() for k in config.api_keys],
            exposed=not is_loopback(config.http_host),
            allow_unauthenticated=config.allow_unauthenticated)
        self._metrics = Metrics()
        # Relays to the sibling replica that owns a session (``sessions.py``); tests pass a
        # transport that stands in for the siblings.
        self._peer_transport = peer_transport
        self._peer_client: httpx.AsyncClient | None = None
        self._relay_failures = FailureLog(logger, "Relaying a session to its replica")
        self._closing: set[asyncio.Task[Any]] = set()
        self._created = int(time.time())
        self._lifespans = 0
        self._tasks: list[asyncio.Task[None]] = []

    # -- plumbing ------------------------------------------------------------------------------

    def build(self) -> Starlette:
        routes = [
            Route("/", self.status, methods=["GET"], name="status"),
            Route("/health", self.health, methods=["GET"], name="health"),
            Route("/metrics", self.metrics, methods=["GET"], name="metrics"),
            Route("/license", self.license, methods=["GET"], name="license"),
            Route("/v1/models", self.list_models, methods=["GET"], name="models"),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"], name="model"),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"], name="chat"),
            Route("/v1/completions", self.completions, methods=["POST"], name="completions"),
            Route("/generate", self.generate, methods=["POST"], name="maritalk_raw"),
            Route("/chat/generate", self.chat_generate, methods=["POST"], name="maritalk_chat"),
        ]
        return Starlette(
            routes=routes,
            # Outermost of the two: it counts the request-id middleware's last-resort 500 too.
            middleware=[Middleware(MetricsMiddleware, metrics=self._metrics, routes=routes),
                        Middleware(RequestIdMiddleware)],
            exception_handlers={
                ServeError: self._on_serve_error,
                HTTPException: self._on_http_error,
            },
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # A colocated replica may run the app under two servers (its own listener and Serve's
        # direct ingress): the background work starts with the first, stops with the last.
        if self._lifespans == 0:
            self._tasks = [asyncio.create_task(self._watch_readiness())]
            if self._gate is not None:
                self._tasks.append(asyncio.create_task(self._gate.run()))
            if self._keyring.sync is not None:
                self._tasks.append(asyncio.create_task(self._keyring.sync.run()))
        self._lifespans += 1
        try:
            yield
        finally:
            self._lifespans -= 1
            if self._lifespans == 0:
                for task in self._tasks:
                    task.cancel()
                if self._keyring.sync is not None:
                    await self._keyring.sync.stop()
                if self._peer_client is not None:
                    await self._peer_client.aclose()
                    self._peer_client = None

    async def _watch_readiness(self) -> None:
        await asyncio.gather(*(self._await_ready(m) for m in self._models.values()))

    async def _await_ready(self, model: _Model) -> None:
        # A replica that keeps failing to start leaves /health at 503: the log says why.
        failures = FailureLog(to_stderr_too(), f"The readiness check of model {model.config.name}")
        while not model.ready:
            try:
                await model.handle.ready.remote()
            except Exception as exc:  # replica still starting, restarting, or failing to start
                failures.failed(exc)
                await asyncio.sleep(self._readiness_retry_s)
            else:
                model.ready = True
                failures.recovered()

    async def _on_serve_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServeError)
        if isinstance(exc, InternalError):
            # Raised while handling the failure, which is its context.
            log_internal(exc.__context__ or exc, request_id(request), request.url.path)
        return JSONResponse(to_error_body(exc), status_code=exc.status, headers=exc.headers)

    async def _on_http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(
            error_body(message, "invalid_request_error", code=kind), status_code=exc.status_code
        )

    def _authorize(self, request: Request) -> KeyPolicy:
        """The request's key (memory only), or 401."""
        try:
            return self._keyring.authenticate(request.headers.get("authorization"))
        except InvalidKeyError as exc:
            raise AuthenticationError(str(exc)) from None

    def _limit(self, policy: KeyPolicy) -> Admission:
        """The key's limits admit the request, or 429 with OpenAI's headers."""
        try:
            return self._keyring.admit(policy)
        except RateLimitedError as exc:
            self._metrics.rate_limited.labels(policy.name, exc.kind).inc()
            retry = exc.retry_after_s
            headers = {"Retry-After": str(max(1, math.ceil(retry))) if math.isfinite(retry)
                       else "60", **exc.headers}
            raise RateLimitError(exc.message, kind=exc.kind, headers=headers) from None

    def _finish(self, admission: Admission, model: _Model, usage: dict[str, Any] | None) -> None:
        """A request the engine answered: counted for its key (``usage`` None: not served)."""
        if usage is None:
            self._keyring.limiter.release(admission)
            return
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        self._keyring.finish(admission, model.config.name, prompt, completion)
        self._metrics.count_key(admission.name, model.config.name, prompt, completion)

    def _session_owner(self, request: Request, body: dict[str, Any]) -> str | None:
        """The sibling replica's URL when another replica of this node owns the request's
        session; None to serve it here."""
        peers = self._keyring.peers
        if len(peers) < 2 or request.headers.get(HOP):
            return None
        session = session_of(request.headers, body)
        found = owner(session, peers) if session is not None else None
        if found is None or found[0] == self._keyring.replica_id:
            return None
        return found[1]

    async def _relay(self, request: Request, raw: bytes, url: str) -> Response | None:
        """The request, as it came, to the sibling that owns its session; its answer streamed
        back as it comes. None when the sibling cannot be reached (then it is served here)."""
        if self._peer_client is None:
            self._peer_client = httpx.AsyncClient(
                transport=self._peer_transport, timeout=httpx.Timeout(None, connect=2.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        target = url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        sent = self._peer_client.build_request(
            request.method, target, content=raw,
            headers=relayed_headers(request.headers, request_id(request)))
        try:
            answer = await self._peer_client.send(sent, stream=True)
        except httpx.HTTPError as exc:
            self._relay_failures.failed(exc)
            return None
        self._relay_failures.recovered()

        def close() -> None:
            task = asyncio.get_running_loop().create_task(answer.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

        return _StreamResponse(answer.aiter_bytes(), on_close=close,
                               status_code=answer.status_code,
                               headers=response_headers(answer.headers))

    async def _read_body(self, request: Request) -> bytes:
        try:
            return await read_bounded(request.headers.get("content-length"), request.stream(),
                                      self._config.max_body_bytes)
        except BodyError as exc:
            error = PayloadTooLargeError if exc.status == 413 else BadRequestError
            raise error(exc.message, code=exc.code) from None

    def _check_license(self) -> None:
        """Memory only: the gate's decision was fetched in the background."""
        if self._gate is None:
            return
        refusal = self._gate.refusal()
        if refusal is not None:
            raise LicenseRefusedError(refusal["message"], status=refusal["status"],
                                      code=refusal["code"],
                                      retry_after_s=refusal.get("retry_after_s"))

    def _model(self, name: Any) -> _Model:
        if name is not None and not isinstance(name, str):
            raise BadRequestError("'model' must be a string.", param="model")
        model = self._models.get(self._aliases.get(name, name) if name is not None
                                 else self._default)
        if model is None:
            raise ModelNotFoundError(
                f"The model {name!r} does not exist; available: {', '.join(self._models)}.",
                param="model",
            )
        return model

    # -- status routes -------------------------------------------------------------------------

    def in_flight(self, model: str | None = None) -> int:
        """Generation requests this process is serving, for one model or all."""
        if model is not None:
            return self._models[model].in_flight
        return sum(m.in_flight for m in self._models.values())

    def _busy(self) -> bool:
        return self.in_flight() > 0

    def _loading(self) -> bool:
        return not all(m.ready for m in self._models.values())

    async def status(self, request: Request) -> Response:
        """MariTalk Local's status route: ``loading`` until every model answers."""
        state = "loading" if self._loading() else ("busy" if self._busy() else "idle")
        return JSONResponse({"status": state, "models": list(self._models)})

    async def health(self, request: Request) -> Response:
        if self._loading():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        if self._config.metrics_auth:
            self._authorize(request)
        parts = [generate_latest(self._metrics.registry).decode()]
        for model in self._models.values():
            if not model.ready:
                continue
            try:
                parts.append(await asyncio.wait_for(model.handle.metrics_text.remote(), 5.0))
            except Exception:
                logger.warning("No engine metrics from %s", model.config.name)
        return Response("".join(parts), media_type="text/plain; version=0.0.4")

    async def license(self, request: Request) -> Response:
        """The customer's view of the license: id, expiry, grace, instances, pending usage."""
        self._authorize(request)
        if self._license_status is None:
            return JSONResponse({"state": "unlicensed", "message": "No license configured."})
        try:
            return JSONResponse(await asyncio.wait_for(self._license_status(), 10.0))
        except Exception as exc:
            raise to_serve_error(exc, request_id(request)) from None

    async def list_models(self, request: Request) -> Response:
        policy = self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            self._card(m) for m in self._models.values() if policy.allows(m.config.served_names)]})

    async def get_model(self, request: Request) -> Response:
        policy = self._authorize(request)
        return JSONResponse(self._card(self._allowed(policy, request.path_params["model"])))

    def _allowed(self, policy: KeyPolicy, name: Any) -> _Model:
        model = self._model(name)
        if not policy.allows(model.config.served_names):
            raise PermissionDeniedError(
                f"The API key {policy.name!r} may not use the model {model.config.name!r}.",
                param="model")
        return model

    def _card(self, model: _Model) -> dict[str, Any]:
        return {
            "id": model.config.name,
            "object": "model",
            "created": self._created,
            "owned_by": "serve_app",
            "max_model_len": model.config.max_model_len,
        }

    # -- generation routes ---------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, "completions")

    async def _admit(self, request: Request
                     ) -> tuple[bytes, dict[str, Any], _Model, KeyPolicy]:
        """Checks every generation request passes, in order: key, license, body, model, the
        key's scope."""
        policy = self._authorize(request)
        self._check_license()
        raw = await self._read_body(request)
        body = parse_json_object(raw)
        return raw, body, self._allowed(policy, body.get("model")), policy

    def _acquire(self, model: _Model) -> None:
        if model.limit is not None and model.in_flight >= model.limit:
            raise OverloadedError(
                "The server is at capacity; retry shortly.", headers={"Retry-After": RETRY_AFTER_S}
            )
        model.in_flight += 1
        self._metrics.in_flight.inc()

    async def _openai(self, request: Request, endpoint: str) -> Response:
        raw, body, model, policy = await self._admit(request)
        relayed = await self._relay_session(request, raw, body)
        if relayed is not None:
            return relayed
        stream = check_generation_body(
            body, max_n=self._config.max_n, max_model_len=model.config.max_model_len,
            endpoint=endpoint,
        )
        rid = request_id(request)
        tap = None
        if stream:
            raw, tap = _with_stream_usage(body, raw)
        job = await self._start_job(model, policy)
        try:
            if not stream:
                try:
                    status, text = await model.unary.remote(endpoint, raw)
                except Exception as exc:
                    raise to_serve_error(exc, rid) from None
                job.close(_usage_of(text) if status == 200 else None)
                return _replica_response(status, text, rid, request.url.path, job.headers)
            gen = model.stream.remote(endpoint, raw)
            try:
                status, text = await gen.__anext__()
            except Exception as exc:
                gen.cancel()
                raise to_serve_error(exc, rid) from None
            if status != 200:
                return _replica_response(status, text, rid, request.url.path, job.headers)
            assert tap is not None
            job.handed_over = True  # the response closes the job when it is over
            relay = _Relay(gen, tap(text), lambda: job.close(tap.usage()), rid,
                           request.url.path, tap)
            return _StreamResponse(
                relay.chunks(),
                on_close=relay.close,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **job.headers},
            )
        finally:
            if not job.handed_over:
                job.close(None)

    async def _relay_session(self, request: Request, raw: bytes,
                             body: dict[str, Any]) -> Response | None:
        """A session another replica of this node owns goes there; its limits, usage and
        fair queue are that replica's business."""
        url = self._session_owner(request, body)
        return None if url is None else await self._relay(request, raw, url)

    async def _start_job(self, model: _Model, policy: KeyPolicy) -> _Job:
        """Admission, in order: the model's capacity (503), the key's limits (429), then the
        key's fair turn at the engine. A failure releases what was taken."""
        self._acquire(model)
        job = _Job(self, model)
        try:
            job.admission = self._limit(policy)
            await model.fair.acquire(policy.name)
            job.fair_held = True
        except BaseException:
            job.close(None)
            raise
        return job

    def _release(self, model: _Model) -> None:
        model.in_flight -= 1
        self._metrics.in_flight.dec()

    async def generate(self, request: Request) -> Response:
        return await self._maritalk(request, "raw")

    async def chat_generate(self, request: Request) -> Response:
        return await self._maritalk(request, "chat")

    async def _maritalk(self, request: Request, kind: str) -> Response:
        raw, body, model, policy = await self._admit(request)
        relayed = await self._relay_session(request, raw, body)
        if relayed is not None:
            return relayed
        try:
            # Refused here, before the Ray hop; the replica validates again for its values.
            _MARITALK_MODELS[kind].model_validate(body)
        except ValidationError as exc:
            raise bad_request(exc) from None
        rid = request_id(request)
        job = await self._start_job(model, policy)
        try:
            status, text = await model.maritalk.remote(kind, raw)
        except Exception as exc:
            raise to_serve_error(exc, rid) from None
        else:
            job.close(_usage_of(text, top_level=True) if status == 200 else None)
        finally:
            job.close(None)
        return _replica_response(status, text, rid, request.url.path, job.headers)


class _Job:
    """What one generation request holds while it runs: the model's admission slot, its key's
    admission and fair-queue turn. ``close`` gives them back once, however the request ends, and
    counts the request's usage for its key."""

    def __init__(self, app: IngressApp, model: _Model) -> None:
        self._app = app
        self._model = model
        self.admission: Admission | None = None
        self.fair_held = False
        self.handed_over = False
        self._closed = False

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.admission is None else self.admission.headers

    def close(self, usage: dict[str, Any] | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self.fair_held and self.admission is not None:
            self._model.fair.release(self.admission.name)
        self._app._release(self._model)
        if self.admission is not None:
            self._app._finish(self.admission, self._model, usage)


def _usage_of(text: str, top_level: bool = False) -> dict[str, Any]:
    """Prompt and completion tokens as vLLM counted them: OpenAI's ``usage``, or MariTalk's
    top-level counts."""
    try:
        data = json.loads(text)
        return data if top_level else (data.get("usage") or {})
    except (ValueError, AttributeError):
        return {}


def _with_stream_usage(body: dict[str, Any], raw: bytes) -> tuple[bytes, _UsageTap]:
    """A stream's tokens are known from vLLM's final usage chunk, which it sends only when asked
    (``stream_options.include_usage``): asked for here when the client did not, and then left
    out of what the client gets."""
    options = body.get("stream_options")
    if (options is not None and not isinstance(options, dict)) or (
            isinstance(options, dict) and options.get("include_usage") is True):
        return raw, _UsageTap(keep=True)  # the client's own (vLLM refuses a malformed one)
    asked = {**body, "stream_options": {**(options or {}), "include_usage": True}}
    return json.dumps(asked).encode(), _UsageTap(keep=False)


class _UsageTap:
    """Watches a stream's SSE text for vLLM's usage chunk (the last before ``[DONE]``, with no
    choices); drops it when the client did not ask for it. Without one (the client left before
    the end) completion tokens are counted as the events relayed, a lower bound."""

    def __init__(self, keep: bool) -> None:
        self._keep = keep
        self._usage: dict[str, Any] | None = None
        self._events = 0

    def __call__(self, text: str) -> str:
        self._events += text.count("data: {")
        if '"usage"' not in text:
            return text
        kept = []
        for event in text.split("\n\n"):
            if event.startswith("data: {") and '"usage"' in event:
                try:
                    chunk = json.loads(event[len("data: "):])
                except ValueError:
                    kept.append(event)
                    continue
                if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
                    self._usage = chunk["usage"]
                    if not self._keep and not chunk.get("choices"):
                        self._events -= 1
                        continue
            kept.append(event)
        return "\n\n".join(kept)

    def usage(self) -> dict[str, Any]:
        if self._usage is not None:
            return self._usage
        return {"prompt_tokens": 0, "completion_tokens": max(0, self._events - 1)}


def _replica_response(status: int, text: str, rid: str | None, path: str,
                      headers: Mapping[str, str] | None = None) -> Response:
    """A replica's answer as is, except that a 5xx names the request id and is logged (the
    replica logged its cause; the body it sent has no details). ``headers``: the key's
    x-ratelimit-* headers."""
    if status < 500:
        return Response(text, status_code=status, media_type=JSON, headers=headers)
    to_stderr_too().error("Request %s on %s: the model replica answered %d: %s", rid, path,
                           status, text[:500])
    body = to_error_body(internal_error(rid))
    return JSONResponse(body, status_code=status)


class _Relay:
    """Relays a replica's stream to the client; ``close`` runs once, however the response ends."""

    def __init__(self, gen: Any, first: str, release: Callable[[], None], rid: str | None,
                 path: str, tap: Callable[[str], str] | None = None) -> None:
        self._gen = gen
        self._tap = tap
        self._first = first
        self._release = release
        self._rid = rid
        self._path = path
        self._finished = False
        self._closed = False

    async def chunks(self) -> AsyncIterator[str]:
        if self._first:
            yield self._first
        try:
            async for text in self._gen:
                if self._tap is not None:
                    text = self._tap(text)
                    if not text:
                        continue
                yield text
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Headers are gone; report in-band the way vLLM does.
            err = to_serve_error(exc, self._rid)
            if isinstance(err, InternalError):
                log_internal(exc, self._rid, self._path)
            yield sse_error(err.status, to_error_body(err))
        self._finished = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._finished:
            self._gen.cancel()  # client went away: the replica's generator is closed, vLLM aborts
        self._release()


class _StreamResponse(StreamingResponse):
    """A client that leaves before the first chunk is read never starts the body iterator, so
    cleanup inside it would never run: the admission slot would leak and the engine would keep
    generating. The response's own ``finally`` always runs."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def build_ingress(config: AppConfig, handles: Mapping[str, Any], **kwargs: Any) -> Starlette:
    return IngressApp(config, handles, **kwargs).build()
