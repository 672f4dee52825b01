"""Everything per key that an ingress replica holds, behind one object: who a request's key is,
whether its limits admit it, what it used. Memory only on the request path; the key actor is
reached by the background round alone (``KeySync``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from serve_app.tenants.limits import Admission, Limiter
from serve_app.tenants.store import ANONYMOUS
from serve_app.tenants.sync import KeySync, UsageMeter
from serve_app.tenants.table import UNNAMED, KeyPolicy, KeyTable


class Keyring:
    """``exposed``: the app is reachable from the network (then a key is always required,
    unless ``allow_unauthenticated``). ``sync`` is None with static keys only (no key store)."""

    def __init__(self, static_keys: Iterable[str] = (), *, exposed: bool = False,
                 allow_unauthenticated: bool = False, sync: KeySync | None = None,
                 now: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.exposed = exposed
        self.allow_unauthenticated = allow_unauthenticated
        if sync is None:
            self.table = KeyTable(static_keys, now=now)
            self.limiter = Limiter(now=monotonic)
            self.meter = UsageMeter(now=now)
        else:
            self.table, self.limiter, self.meter = sync.table, sync.limiter, sync.meter
        self.sync = sync

    def required(self) -> bool:
        """Whether a request without a key is refused (see ``exposure.py``)."""
        if self.allow_unauthenticated:
            return False
        return self.exposed or self.table.any_keys()

    def authenticate(self, authorization: str | None) -> KeyPolicy:
        """The key's policy (``anonymous`` for a request without a key where none is needed);
        raises ``InvalidKeyError``. A server with no key at all takes any ``Authorization``:
        OpenAI's clients always send one, and a keyless server is called with placeholders like
        ``api_key="EMPTY"``, as vLLM's is."""
        if not self.required() and (not authorization or not self.table.any_keys()):
            return UNNAMED[ANONYMOUS]
        return self.table.authenticate(authorization)

    def admit(self, policy: KeyPolicy) -> Admission:
        return self.limiter.admit(policy)

    def finish(self, admission: Admission, model: str, prompt_tokens: int,
               completion_tokens: int) -> None:
        """A request is done (or gone): count it, charge its tokens, free its slot."""
        self.meter.add(admission.name, model, 1, prompt_tokens, completion_tokens)
        self.limiter.settle(admission, prompt_tokens + completion_tokens)
        self.limiter.release(admission)

    @property
    def peers(self) -> list[tuple[str, str]]:
        return [] if self.sync is None else self.sync.peers

    @property
    def replica_id(self) -> str | None:
        return None if self.sync is None else self.sync.replica_id
