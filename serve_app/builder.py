"""Bind the Serve graph: the first model's replicas serving HTTP themselves (colocated, the
default) or a router ingress in front of every model; see ``deployments.py``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from license_contract import LicenseError, verify_key
from serve_app.config import AppConfig, ModelConfig, Settings
from serve_app.deployments import Ingress, colocated, started
from serve_app.llm_server import EngineFactory, LLMServer
from serve_app.versions import check_versions

logger = logging.getLogger(__name__)


def deployment_options(model: ModelConfig, env_vars: dict[str, str]) -> dict[str, Any]:
    """Serve options for one model's LLM deployment (pure: unit-tested without Ray)."""
    actor: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}}
    options: dict[str, Any] = {
        "name": f"LLM:{model.name}",
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests,
        # Engine start (weights, KV cache, warm-up) outlasts Serve's defaults on big models.
        "health_check_timeout_s": 120,
        "graceful_shutdown_timeout_s": 30,
    }
    device = model.scheduling_device()
    if device == "cpu":
        # vLLM pins its engine to a core of its own choosing; reserving CPUs in Ray on top
        # of that leaves the next deployment unschedulable on small boxes.
        actor["num_cpus"] = 0
    elif model.tensor_parallel_size == 1:
        actor.update(num_cpus=1, num_gpus=1)
    else:
        # The replica holds bundle 0; vLLM's Ray workers take one GPU bundle each, all on one
        # node so tensor-parallel traffic stays on NVLink/PCIe.
        actor.update(num_cpus=0, num_gpus=0)
        options["placement_group_bundles"] = [{"CPU": 1, "GPU": 1}] + [
            {"GPU": 1} for _ in range(model.tensor_parallel_size - 1)
        ]
        options["placement_group_strategy"] = "STRICT_PACK"
    if model.accelerator_type and device == "gpu":
        actor["accelerator_type"] = model.accelerator_type
    options["ray_actor_options"] = actor
    if model.min_replicas == model.max_replicas:
        options["num_replicas"] = model.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": model.min_replicas,
            "max_replicas": model.max_replicas,
            "initial_replicas": max(1, model.min_replicas),
            "target_ongoing_requests": model.target_ongoing_requests,
        }
    return options


def ingress_options(config: AppConfig) -> dict[str, Any]:
    return {
        "name": "Ingress",
        "num_replicas": 1,
        "max_ongoing_requests": config.ingress_max_ongoing_requests,
        "ray_actor_options": {
            "num_cpus": 0,
            "runtime_env": {"env_vars": config.runtime_env_vars()},
        },
    }


def colocated_options(model: ModelConfig, config: AppConfig) -> dict[str, Any]:
    """The first model's deployment when it is also the ingress: its resources and scaling, but
    Serve's per-replica limit sized for all HTTP traffic (the app admits generation itself)."""
    options = deployment_options(model, config.runtime_env_vars())
    options["max_ongoing_requests"] = config.ingress_max_ongoing_requests
    options["max_queued_requests"] = -1
    if "autoscaling_config" in options:
        # Serve does not see requests that arrive on the replica's own listener.
        options["autoscaling_config"]["policy"] = {
            "policy_function": "serve_app.autoscaling:in_flight_policy"}
    return options


def instance_cap(config: AppConfig) -> int | None:
    """The fewest replicas any one model may scale to: the customer's cap and the license's,
    read offline from the key. Expiry is the license actor's to judge (on the license server's
    clock), so an expired key still caps. A key that does not verify leaves the customer's cap
    alone, said in the log: the actor refuses it too, so the app will not serve."""
    lic = config.license
    if lic is None:
        return None
    caps = [lic.max_instances] if lic.max_instances else []
    try:
        entitled = verify_key(lic.key.get_secret_value(), check_expiry=False)
    except LicenseError as exc:
        logger.warning("No instance cap from the license key: %s Capping by the customer's "
                       "max_instances only (%s); the license actor refuses this key.", exc,
                       lic.max_instances or "none set")
    else:
        if entitled.max_instances:
            caps.append(entitled.max_instances)
    return min(caps) if caps else None


def merged_options(options: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` with ``extra`` laid over it; dict values (``autoscaling_config``,
    ``ray_actor_options``) are merged key by key, so an override keeps what it does not name
    (the scaling policy, the runtime environment)."""
    out = dict(options)
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def build_app_from_config(config: AppConfig, llm_cls: type = LLMServer,
                          engine_factory: EngineFactory | None = None,
                          llm_options: Mapping[str, Any] | None = None) -> Application:
    """``llm_cls`` is the LLM deployment's class: ``LLMServer``, or a stand-in with the same
    methods (a storing constructor, an async ``start``) in tests of the serving graph.
    ``engine_factory``, if given, reaches ``llm_cls`` as its keyword argument of that name:
    a stand-in engine for ``LLMServer`` (it must pickle: Serve ships it to the replicas).
    ``llm_options`` are Serve options laid over every LLM deployment's (``merged_options``):
    e.g. the autoscaler's ``upscale_delay_s``/``downscale_delay_s``, or a custom resource that
    picks a node type.

    Every way of starting the app builds it here, so this is where other vLLM or Ray releases
    than the pinned ones are refused (``versions.check_versions``)."""
    check_versions(config.allow_unpinned_versions)
    env = config.runtime_env_vars()
    cap = instance_cap(config)
    models = []
    for m in config.models:
        if cap is not None and m.max_replicas > cap:
            logger.warning("Capping %s at %d replicas (license/instance cap; asked for %d)",
                           m.name, cap, m.max_replicas)
            m = m.model_copy(update={"max_replicas": cap,
                                     "min_replicas": min(m.min_replicas, cap)})
        models.append(m)
    config = config.model_copy(update={"models": tuple(models)})
    behind = models[1:] if config.colocate_ingress else models
    llm_kwargs = {} if engine_factory is None else {"engine_factory": engine_factory}
    handles = {
        m.name: serve.deployment(started(llm_cls))
        .options(**merged_options(deployment_options(m, env), llm_options))
        .bind(m, config.model_cache_dir, config.license, **llm_kwargs)
        for m in behind
    }
    if config.colocate_ingress:
        cls = colocated(llm_cls)
        options = merged_options(colocated_options(models[0], config), llm_options)
        ingress_kwargs = llm_kwargs
    else:
        cls, options, ingress_kwargs = Ingress, ingress_options(config), {}
    return serve.deployment(serve.ingress()(cls)).options(**options).bind(
        config, handles, **ingress_kwargs)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """``serve run serve_app:build_app key=value ...`` and Serve configs' ``import_path``.

    ``args`` with a ``models`` list is a full ``AppConfig``; otherwise it overrides the
    ``SERVE_APP_*`` environment (see ``Settings``).
    """
    args = dict(args or {})
    if "models" in args:
        config = AppConfig.model_validate(args)
    else:
        config = Settings(**args).to_app_config()
    return build_app_from_config(config)
