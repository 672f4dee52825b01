"""The HTTP face of the app: OpenAI and MariTalk Local routes, auth, limits, errors, metrics.

The request path touches memory and one handle call only. Models are reached through
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
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

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
        self._keys = [k.get_secret_value().encode() for k in config.api_keys]
        self._metrics = Metrics()
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
        self._lifespans += 1
        try:
            yield
        finally:
            self._lifespans -= 1
            if self._lifespans == 0:
                for task in self._tasks:
                    task.cancel()

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

    def _authorize(self, request: Request) -> None:
        if not self._keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = token.strip().encode()
        # Compare against every key, always: timing says nothing about which key nearly matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if scheme.lower() != "bearer" or not matched:
            raise AuthenticationError(
                "Missing or invalid API key: send 'Authorization: Bearer <key>'."
            )

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
                                      code=refusal["code"])

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
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._card(m) for m in self._models.values()]})

    async def get_model(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(self._card(self._model(request.path_params["model"])))

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

    async def _admit(self, request: Request) -> tuple[bytes, dict[str, Any], _Model]:
        """Checks every generation request passes, in order: key, license, body, model."""
        self._authorize(request)
        self._check_license()
        raw = await self._read_body(request)
        body = parse_json_object(raw)
        return raw, body, self._model(body.get("model"))

    def _acquire(self, model: _Model) -> None:
        if model.limit is not None and model.in_flight >= model.limit:
            raise OverloadedError(
                "The server is at capacity; retry shortly.", headers={"Retry-After": RETRY_AFTER_S}
            )
        model.in_flight += 1
        self._metrics.in_flight.inc()

    async def _openai(self, request: Request, endpoint: str) -> Response:
        raw, body, model = await self._admit(request)
        stream = check_generation_body(
            body, max_n=self._config.max_n, max_model_len=model.config.max_model_len,
            endpoint=endpoint,
        )
        rid = request_id(request)
        self._acquire(model)
        release = True
        try:
            if not stream:
                try:
                    status, text = await model.unary.remote(endpoint, raw)
                except Exception as exc:
                    raise to_serve_error(exc, rid) from None
                return _replica_response(status, text, rid, request.url.path)
            gen = model.stream.remote(endpoint, raw)
            try:
                status, text = await gen.__anext__()
            except Exception as exc:
                gen.cancel()
                raise to_serve_error(exc, rid) from None
            if status != 200:
                return _replica_response(status, text, rid, request.url.path)
            release = False  # the response releases when it is over
            relay = _Relay(gen, text, lambda: self._release(model), rid, request.url.path)
            return _StreamResponse(
                relay.chunks(),
                on_close=relay.close,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        finally:
            if release:
                self._release(model)

    def _release(self, model: _Model) -> None:
        model.in_flight -= 1
        self._metrics.in_flight.dec()

    async def generate(self, request: Request) -> Response:
        return await self._maritalk(request, "raw")

    async def chat_generate(self, request: Request) -> Response:
        return await self._maritalk(request, "chat")

    async def _maritalk(self, request: Request, kind: str) -> Response:
        raw, body, model = await self._admit(request)
        try:
            # Refused here, before the Ray hop; the replica validates again for its values.
            _MARITALK_MODELS[kind].model_validate(body)
        except ValidationError as exc:
            raise bad_request(exc) from None
        rid = request_id(request)
        self._acquire(model)
        try:
            status, text = await model.maritalk.remote(kind, raw)
        except Exception as exc:
            raise to_serve_error(exc, rid) from None
        finally:
            self._release(model)
        return _replica_response(status, text, rid, request.url.path)


def _replica_response(status: int, text: str, rid: str | None, path: str) -> Response:
    """A replica's answer as is, except that a 5xx names the request id and is logged (the
    replica logged its cause; the body it sent has no details)."""
    if status < 500:
        return Response(text, status_code=status, media_type=JSON)
    to_stderr_too().error("Request %s on %s: the model replica answered %d: %s", rid, path,
                           status, text[:500])
    body = to_error_body(internal_error(rid))
    return JSONResponse(body, status_code=status)


class _Relay:
    """Relays a replica's stream to the client; ``close`` runs once, however the response ends."""

    def __init__(self, gen: Any, first: str, release: Callable[[], None], rid: str | None,
                 path: str) -> None:
        self._gen = gen
        self._first = first
        self._release = release
        self._rid = rid
        self._path = path
        self._finished = False
        self._closed = False

    async def chunks(self) -> AsyncIterator[str]:
        yield self._first
        try:
            async for text in self._gen:
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
