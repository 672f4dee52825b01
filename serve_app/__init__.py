"""Self-hosted LLM serving on Ray Serve + vLLM.

``serve run serve_app:app`` serves the defaults (``SERVE_APP_*`` env overrides them);
``serve run serve_app:build_app key=value ...`` takes arguments. Both are built lazily so that
importing the package costs nothing.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from serve_app.builder import build_app

        return build_app()
    if name == "build_app":
        from serve_app.builder import build_app

        return build_app
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
