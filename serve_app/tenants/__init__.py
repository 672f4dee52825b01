"""Many teams on one deployment: named API keys (hashed, managed live), their limits and usage,
a fair share of the engine per key, and the refusal to serve the network without a key.

The key store (SQLite, on the head node) and its actor hold the truth; every ingress replica
holds the whole table in memory (``Keyring``) and meets the actor only in a background round.
The rest of the app uses these names; the modules behind them are this package's own.
"""

from serve_app.tenants.actor import KeyActor
from serve_app.tenants.cli import keys_command, usage_command
from serve_app.tenants.exposure import (
    UnauthenticatedExposureError,
    check_exposure,
    exposed,
    is_loopback,
)
from serve_app.tenants.fair import FairQueue
from serve_app.tenants.keyring import Keyring
from serve_app.tenants.limits import Admission, Limiter, RateLimitedError, duration
from serve_app.tenants.placement import actor_name, get_key_actor
from serve_app.tenants.shares import ShareBook, whole_slots
from serve_app.tenants.store import ANONYMOUS, STATIC, KeyStore, KeyStoreError
from serve_app.tenants.sync import KeySync, UsageMeter
from serve_app.tenants.table import InvalidKeyError, KeyPolicy, KeyTable

__all__ = [
    "ANONYMOUS", "STATIC", "Admission", "FairQueue", "InvalidKeyError", "KeyActor", "KeyPolicy",
    "KeyStore", "KeyStoreError", "KeySync", "KeyTable", "Keyring", "Limiter",
    "RateLimitedError", "ShareBook", "UnauthenticatedExposureError", "UsageMeter",
    "actor_name", "check_exposure", "duration", "exposed", "get_key_actor", "is_loopback",
    "keys_command", "usage_command", "whole_slots",
]
