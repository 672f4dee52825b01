"""``python -m serve_app``: the whole stack in the foreground, stopped cleanly by Ctrl-C.

Starts a local Ray instance, Serve's HTTP proxy on ``SERVE_APP_HOST:SERVE_APP_PORT``
(127.0.0.1:9000 by default, MariTalk Local's port) and the app; prints how to call it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import urllib.request

from serve_app.affinity import pin_to_frontend
from serve_app.config import RAY_SERVE_ENV, TELEMETRY_OFF_ENV, Settings
from serve_app.models import resolve_model

logger = logging.getLogger("serve_app")


def _wait_healthy(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    return False


def _usage(host: str, port: int, model: str, keyed: bool) -> str:
    url = f"http://{host}:{port}"
    auth = ' -H "Authorization: Bearer $KEY"' if keyed else ""
    return f"""
Serving {model!r} at {url}
  OpenAI:   curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\
              -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'
            openai.OpenAI(base_url="{url}/v1", api_key="...")
  MariTalk: maritalk.MariTalkLocal(host="{host}", port={port}).generate("Hi!")
  Status:   {url}/   Health: {url}/health   Metrics: {url}/metrics
Press Ctrl-C to stop.
"""


def run(settings: Settings) -> int:
    # Set before Ray starts so every process it spawns (and vLLM's) inherits them.
    os.environ.update(TELEMETRY_OFF_ENV)
    for key, value in RAY_SERVE_ENV.items():
        os.environ.setdefault(key, value)  # an explicit choice of the user's wins
    config = settings.to_app_config()
    for model in config.models:
        print(f"Preparing model {model.name} from {model.source} ...", flush=True)
        resolve_model(model.source, config.model_cache_dir)

    import ray
    from ray import serve

    from serve_app.builder import build_app_from_config

    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    if any(m.device == "cpu" for m in config.models):
        pin_to_frontend()  # every Ray process inherits this; see affinity.py
    ray.init(include_dashboard=False, runtime_env={"env_vars": dict(TELEMETRY_OFF_ENV)})
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app_from_config(config), name="serve_app", route_prefix="/", blocking=False)
        url = f"http://{settings.host}:{settings.port}"
        print("Starting vLLM replicas ...", flush=True)
        if not _wait_healthy(url, timeout_s=600):
            print("The app did not become healthy within 10 minutes.", file=sys.stderr)
            return 1
        print(_usage(settings.host, settings.port, config.models[0].name, bool(config.api_keys)),
              flush=True)
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        while not stop:
            time.sleep(0.5)
        print("\nStopping ...", flush=True)
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve_app", description=__doc__)
    parser.add_argument("--port", type=int, help="HTTP port (default 9000).")
    parser.add_argument("--host", help="HTTP host (default 127.0.0.1).")
    parser.add_argument("--model", help="Model source (default the builtin SmolLM2).")
    ns = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(ns).items() if v is not None}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(run(Settings(**overrides)))
