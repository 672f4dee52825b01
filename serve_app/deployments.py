"""The two ways the HTTP face meets the engines, as Serve deployment classes.

``ColocatedIngress`` (the default) serves HTTP from the replicas that run the first model's
engine: a request goes client -> uvicorn in the replica (on the public port, ``listener.py``) ->
vLLM, the path of `vllm serve`. Under `serve run`, Serve's proxy reaches the same app through
Serve's direct ingress too. Other models, if any, sit behind handles as usual. ``Ingress`` is a
CPU-only router replica in front of every model: load-aware balancing over many replicas and
scale-to-zero, at the price of one Ray hop per streamed message, which costs tokens/s and TTFT
on small models (docs/performance.md has the runs).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette

from serve_app.affinity import pin_to_frontend
from serve_app.autoscaling import METRIC
from serve_app.config import AppConfig
from serve_app.ingress import IngressApp, build_ingress
from serve_app.listener import ReplicaListener, loopback_socket
from serve_app.ray_internals import serve_http_host
from serve_app.tenants import Keyring, check_exposure, exposed

logger = logging.getLogger("ray.serve")


def license_kwargs(config: AppConfig) -> dict[str, Any]:
    """The ingress's view of the license actor: a cached gate and the status call."""
    if config.license is None:
        return {}
    from serve_app.licensing import LicenseGate, get_license_actor

    actor = get_license_actor(config.license)
    return {
        "license_gate": LicenseGate(lambda: actor.state.remote()),
        "license_status": lambda: actor.status.remote(),
    }


async def start_keyring(config: AppConfig, hosts: list[str | None],
                        peer: dict[str, str] | None = None) -> Keyring:
    """This replica's keys: the static ones, and with a key store the key actor's table, synced
    once before anything else starts. Then the exposure check (``tenants.exposure``): a replica
    that would serve ``hosts`` beyond loopback with no key refuses to start, before its engine
    loads."""
    static = [k.get_secret_value() for k in config.api_keys]
    sync = None
    if config.key_store_path is not None:
        import ray
        from ray import serve

        from serve_app.tenants import KeySync, KeyTable, Limiter, UsageMeter, get_key_actor

        actor = get_key_actor(config.key_store_path)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside a Serve replica (tests of the class)
            replica = "replica"
        sync = KeySync(
            lambda rid, version, report: actor.sync.remote(rid, version, report),
            KeyTable(static), Limiter(), UsageMeter(),
            # A restarted replica is a new reporter: its usage counts from one again.
            replica_id=f"{replica}-{uuid.uuid4().hex[:8]}",
            peer=peer and {**peer, "node": ray.get_runtime_context().get_node_id()},
            goodbye=lambda rid, usage: actor.goodbye.remote(rid, usage))
        await sync.first()
    keyring = Keyring(static, exposed=bool(exposed(hosts)),
                      allow_unauthenticated=config.allow_unauthenticated, sync=sync)
    warning = check_exposure(hosts, keyring.table.active_keys(), config.allow_unauthenticated)
    if warning:
        logger.warning(warning)
    return keyring


class LocalStream:
    """A streaming call on an object in this process, shaped like a Serve response generator."""

    def __init__(self, gen: AsyncIterator[Any]) -> None:
        self._gen = gen
        self._done = False

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._gen.__anext__()
        except BaseException:
            self._done = True
            raise

    def cancel(self) -> None:
        """Close the generator; vLLM aborts a request whose generator is closed."""
        if self._done:
            return
        self._done = True
        aclose = getattr(self._gen, "aclose", None)
        if aclose is not None:
            task = asyncio.get_running_loop().create_task(aclose())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())


class LocalHandle:
    """The part of ``DeploymentHandle`` the ingress uses, calling ``target`` directly."""

    def __init__(self, target: Any, method_name: str | None = None, stream: bool = False) -> None:
        self._target = target
        self._method_name = method_name
        self._stream = stream

    def options(self, *, method_name: str | None = None, stream: bool = False) -> LocalHandle:
        return LocalHandle(self._target, method_name or self._method_name, stream)

    def __getattr__(self, name: str) -> LocalHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        return LocalHandle(self._target, name, self._stream)

    def remote(self, *args: Any) -> Any:
        result = getattr(self._target, self._method_name or "__call__")(*args)
        return LocalStream(result) if self._stream else result


class Ingress:
    """The router layout's ingress: a CPU-only replica that reaches every model by handle."""

    async def __init__(self, config: AppConfig, handles: dict[str, Any]) -> None:
        if any(m.local_device() == "cpu" for m in config.models):
            pin_to_frontend()
        keyring = await start_keyring(config, [await serve_http_host()])
        self._app = build_ingress(config, handles, keyring=keyring, **license_kwargs(config))

    async def __serve_build_asgi_app__(self) -> Starlette:
        # Serve's undocumented late-bound ASGI hook (ray_internals.ASGI_HOOK).
        return self._app


class ColocatedIngress:
    """Mixed in before the LLM class (``colocated(LLMServer)``): the engine's replica serves
    HTTP itself, on ``config.http_port`` (``listener.py``) and, if Serve's proxy runs, through
    Serve's direct ingress too; both reach the same app. Its async constructor constructs the
    LLM class and awaits its ``start()`` before it builds the app and listens. Requests for the
    local model are admitted up to its ``max_ongoing_requests + max_queued_requests`` (vLLM
    queues them) and refused with 503 beyond that, in OpenAI's error format; the deployment's
    own Serve limit is sized for all HTTP traffic so that health and metrics probes never queue
    behind generation.
    """

    # Within one process there is no hop whose messages coalescing would save.
    _coalesce_streams = False
    # Serve stops a replica after its graceful_shutdown_timeout_s; drain within it.
    _drain_s = 25.0

    async def __init__(self, config: AppConfig, handles: dict[str, Any], **llm_kwargs: Any) -> None:
        self._listener: ReplicaListener | None = None
        local = config.models[0]
        self._local_name = local.name
        hosts = [await serve_http_host(),
                 config.http_host if config.http_port is not None else None]
        # Sibling replicas on the shared port relay the sessions this one owns to its private
        # loopback port (sessions.py); the key actor tells them where it is.
        private = loopback_socket() if config.http_port is not None else None
        peer = None if private is None else {
            "url": f"http://127.0.0.1:{private.getsockname()[1]}"}
        keyring = await start_keyring(config, hosts, peer)
        await _construct_and_start(super(), local, config.model_cache_dir, config.license,
                                   **llm_kwargs)
        queued = max(local.max_queued_requests, 0)
        self._ingress = IngressApp(
            config,
            {local.name: LocalHandle(self), **handles},
            limits={local.name: local.max_ongoing_requests + queued},
            keyring=keyring,
            **license_kwargs(config),
        )
        self._app = self._ingress.build()
        if config.http_port is not None:
            # Only now: the kernel hands connections to a socket as soon as it listens, and
            # this replica's engine is up only from here on.
            self._listener = ReplicaListener(self._app, config.http_host, config.http_port,
                                             self._drain_s, private)
            await self._listener.start()

    async def __serve_build_asgi_app__(self) -> Starlette:
        # Serve's undocumented late-bound ASGI hook (ray_internals.ASGI_HOOK).
        return self._app

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler counts only requests that pass through Serve; ours mostly come
        through the replica's own listener (``autoscaling.py`` reads this)."""
        return {METRIC: float(self._ingress.in_flight(self._local_name))}

    async def check_health(self) -> None:
        if self._listener is not None and not self._listener.alive:
            raise RuntimeError("the replica's HTTP server stopped")
        probe = getattr(super(), "check_health", None)
        if probe is not None:
            await probe()

    async def __del__(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
        super_del = getattr(super(), "__del__", None)
        if super_del is not None:
            result = super_del()
            if inspect.isawaitable(result):
                await result


async def _construct_and_start(parent: Any, *args: Any, **kwargs: Any) -> None:
    """``parent.__init__`` (the LLM class's, which only stores), then its ``start()``."""
    parent.__init__(*args, **kwargs)
    await parent.start()


class Started:
    """Mixed in before the LLM class (``started(LLMServer)``) for Serve: an async constructor
    that returns once the engine is up. Serve awaits it, so the replica takes no request and
    counts as healthy only after ``start()``."""

    async def __init__(self, *args: Any, **kwargs: Any) -> None:
        await _construct_and_start(super(), *args, **kwargs)


def started(llm_cls: type) -> type:
    """``Started`` over ``llm_cls``: what Serve deploys for a model behind a handle."""
    return type(f"Started{llm_cls.__name__}", (Started, llm_cls), {})


def colocated(llm_cls: type) -> type:
    """``ColocatedIngress`` over ``llm_cls`` (``LLMServer``, or a stand-in in tests)."""
    return type(f"Colocated{llm_cls.__name__}", (ColocatedIngress, llm_cls), {})
