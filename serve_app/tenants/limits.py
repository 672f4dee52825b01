"""Per-key limits inside one replica: requests and tokens per minute, concurrent requests.

Each limit is enforced locally, in memory, on this replica's *share* of it: the key actor hands
every replica a share of each key (``shares.py``), the shares of a key sum to at most 1, and a
replica's buckets are sized by its share. Nothing on the request path leaves the process.

Per minute limits are token buckets: capacity one minute's worth of the share, refilled
continuously (``limit * share / 60`` per second), starting full. Over any interval of ``T``
seconds a key is admitted at most ``limit * (1 + T / 60)`` on one replica, and the same across
replicas as long as the shares sum to 1 (how close they stay while shares move: ``shares.py``).
Tokens are known only when a request is done (vLLM's ``usage``), so a request is admitted while
the token bucket is positive and charged after: the bucket may go into debt, which later
requests wait out. The overshoot of the token limit is at most the tokens of the requests
admitted while the bucket was last positive. Concurrent requests are counted exactly, against
this replica's whole number of the key's slots.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from serve_app.tenants.table import KeyPolicy

MINUTE = 60.0


class Bucket:
    """A token bucket of ``capacity`` refilled by ``capacity`` per minute; ``level`` may go
    negative (token debt)."""

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity = capacity
        self.level = capacity
        self._at = now

    @property
    def rate(self) -> float:
        return self.capacity / MINUTE

    def refill(self, now: float) -> None:
        if now > self._at:
            self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = max(self._at, now)

    def resize(self, capacity: float, now: float) -> None:
        """A new share: the rate follows at once; the level never grows by it (only by refill),
        and shrinks to the new capacity, so resizing never hands out a burst."""
        self.refill(now)
        self.capacity = capacity
        self.level = min(self.level, capacity)

    def take(self, amount: float, need: float, now: float) -> bool:
        """Take ``amount`` if at least ``need`` is there."""
        self.refill(now)
        if self.level < need:
            return False
        self.level -= amount
        return True

    def charge(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def wait_for(self, need: float, now: float) -> float:
        """Seconds until ``need`` is there (inf if the bucket has no capacity)."""
        self.refill(now)
        missing = need - self.level
        if missing <= 0:
            return 0.0
        return math.inf if self.rate <= 0 else missing / self.rate

    def until_full(self, now: float) -> float:
        return self.wait_for(self.capacity, now)


class RateLimitedError(Exception):
    """Over a limit: ``kind`` is ``requests`` or ``tokens`` (OpenAI's error types)."""

    def __init__(self, message: str, kind: str, retry_after_s: float,
                 headers: dict[str, str]) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.retry_after_s = retry_after_s
        self.headers = headers


def duration(seconds: float) -> str:
    """OpenAI's spelling of the x-ratelimit-reset-* values: ``1s``, ``6m0s``, ``20ms``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class _KeyState:
    policy: KeyPolicy
    share: float
    requests: Bucket | None
    tokens: Bucket | None
    slots: int | None
    in_flight: int = 0
    # Since the last report to the key actor: what was asked of this replica.
    asked: int = 0


@dataclass
class Admission:
    """An admitted request: what it holds, and the headers its response carries."""

    name: str
    headers: dict[str, str] = field(default_factory=dict)
    holds_slot: bool = False
    settled: bool = False


class Limiter:
    """``now`` is a monotonic clock (injected by tests)."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._keys: dict[str, _KeyState] = {}
        self._shares: dict[str, tuple[float, int | None]] = {}
        self._default_share = 1.0

    def apply(self, shares: Mapping[str, tuple[float, int | None]],
              default_share: float = 1.0) -> None:
        """This replica's ``(share, concurrency slots)`` per key from the key actor; a key it
        did not name (none should be missing: the actor answers for every key of the table it
        sends) gets ``default_share`` (1 / the replicas it knows of)."""
        self._shares = dict(shares)
        self._default_share = default_share
        now = self._now()
        for state in self._keys.values():
            self._resize(state, now)

    def _share(self, policy: KeyPolicy) -> tuple[float, int | None]:
        found = self._shares.get(policy.name)
        if found is not None:
            return found
        share = self._default_share
        slots = (None if policy.max_concurrent is None
                 else math.floor(policy.max_concurrent * share))
        return share, slots

    def _resize(self, state: _KeyState, now: float) -> None:
        p = state.policy
        state.share, slots = self._share(p)
        if state.requests is not None and p.rpm is not None:
            state.requests.resize(p.rpm * state.share, now)
        if state.tokens is not None and p.tpm is not None:
            state.tokens.resize(p.tpm * state.share, now)
        state.slots = slots if p.max_concurrent is not None else None

    def _state(self, policy: KeyPolicy) -> _KeyState:
        state = self._keys.get(policy.name)
        now = self._now()
        if state is None or state.policy != policy:
            share, slots = self._share(policy)
            fresh = _KeyState(
                policy, share,
                Bucket(policy.rpm * share, now) if policy.rpm is not None else None,
                Bucket(policy.tpm * share, now) if policy.tpm is not None else None,
                slots if policy.max_concurrent is not None else None)
            if state is not None:  # the limits changed: keep what was spent and what runs
                fresh.in_flight, fresh.asked = state.in_flight, state.asked
                for old, new in ((state.requests, fresh.requests), (state.tokens, fresh.tokens)):
                    if old is not None and new is not None:
                        new.level = min(new.capacity, old.level)
            self._keys[policy.name] = state = fresh
        return state

    def admit(self, policy: KeyPolicy) -> Admission:
        """Admit a request of ``policy``'s key or raise ``RateLimitedError``."""
        admission = Admission(policy.name)
        if not policy.limited:
            return admission
        state = self._state(policy)
        state.asked += 1
        now = self._now()
        p = state.policy
        if state.slots is not None and state.in_flight >= state.slots:
            raise RateLimitedError(
                f"Rate limit reached for key {p.name!r}: at most {p.max_concurrent} concurrent "
                "requests. Retry when one of them is done.", "requests", 1.0,
                self._headers(state, now))
        wait = 0.0 if state.tokens is None else state.tokens.wait_for(1, now)
        if wait > 0:
            raise RateLimitedError(
                f"Rate limit reached for key {p.name!r} on tokens per minute: limit {p.tpm}. "
                f"Retry in {_seconds(wait)} s.", "tokens", wait, self._headers(state, now))
        if state.requests is not None and not state.requests.take(1, 1, now):
            wait = state.requests.wait_for(1, now)
            raise RateLimitedError(
                f"Rate limit reached for key {p.name!r} on requests per minute: limit {p.rpm}. "
                f"Retry in {_seconds(wait)} s.", "requests", wait, self._headers(state, now))
        if state.slots is not None:
            state.in_flight += 1
            admission.holds_slot = True
        admission.headers = self._headers(state, now)
        return admission

    def settle(self, admission: Admission, tokens: int) -> None:
        """Charge a finished request's tokens (prompt plus completion), once."""
        if admission.settled:
            return
        admission.settled = True
        state = self._keys.get(admission.name)
        if state is not None and state.tokens is not None and tokens:
            state.tokens.charge(tokens, self._now())

    def release(self, admission: Admission) -> None:
        """The request is over: its concurrency slot is free again."""
        if admission.holds_slot:
            admission.holds_slot = False
            state = self._keys.get(admission.name)
            if state is not None:
                state.in_flight -= 1

    def demand(self) -> dict[str, int]:
        """Requests asked of this replica per key since the last call (for the key actor's
        rebalancing), counting refused ones: they are what the share was too small for."""
        out = {name: s.asked for name, s in self._keys.items() if s.asked}
        for state in self._keys.values():
            state.asked = 0
        return out

    def forget(self, names: set[str]) -> None:
        """Keys gone from the table (or unlimited now) keep no state; running requests of
        theirs release nothing (``release`` finds no state)."""
        for name in set(self._keys) - names:
            del self._keys[name]

    def _headers(self, state: _KeyState, now: float) -> dict[str, str]:
        """The x-ratelimit-* headers OpenAI's clients read. Limits are the key's whole limits;
        remaining counts are estimated from this replica's bucket and share (exact on one
        replica)."""
        out: dict[str, str] = {}
        p = state.policy
        for kind, limit, bucket in (("requests", p.rpm, state.requests),
                                    ("tokens", p.tpm, state.tokens)):
            if limit is None or bucket is None:
                continue
            bucket.refill(now)
            share = state.share or 1.0
            remaining = max(0, min(limit, math.floor(bucket.level / share)))
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            out[f"x-ratelimit-reset-{kind}"] = duration(bucket.until_full(now))
        return out


def _seconds(wait: float) -> str:
    return "a while" if math.isinf(wait) else str(max(1, math.ceil(wait)))
