"""Which channel a call tries first, which it skips, and which key it sends: order, cooldown, rotation.

A model's channels are tried in priority order (lower first), and among channels of one
priority in a random order weighted by `weight`. A channel that fails `failures` times in
a row, or answers with `Retry-After`, cools down: it is skipped for `Retry-After` seconds,
else `seconds`, doubling while it keeps failing (up to `cap`). When its cooldown ends, one
call probes it (half-open: the others still skip it); success restores it, failure cools it
again for twice as long. A single 429 without `Retry-After` counts as one failure. When every
channel of a model is cooling down, the call goes to the one whose cooldown ends first rather
than being refused. A provider's keys rotate per call, and a key refused (401, 403, 429) cools
down the same way.

This state is per process: each web process learns an outage from its own calls.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from app.core.catalog import Channel, Provider

# What makes a call move on to the next channel, before anything was sent to the client: the
# provider is away or overloaded (408, 429, 5xx, Anthropic's 529), or the gateway's own key or
# access there is refused (401, 403: the next channel has its own). Any other 4xx is the
# client's error and goes back as is: the next channel would refuse it too.
FAILOVER_STATUSES = frozenset({401, 403, 408, 429, 500, 502, 503, 504, 529})
KEY_REFUSED = frozenset({401, 403, 429})
MAX_COOLDOWN = 600.0
# A probe that has not ended after this long (its call was cancelled, its client left) no longer
# keeps the channel from other calls.
PROBE_TIMEOUT = 60.0


@dataclass
class _State:
    failures: int = 0  # in a row
    until: float = 0.0  # cooling down until (the clock's time); 0: not cooling
    strikes: int = 0  # cooldowns in a row: each doubles the next
    probing: bool = False  # its cooldown ended and one call is trying it
    probe_at: float = 0.0  # when that call began
    calls: int = 0
    errors: int = 0
    last_error: str = ""
    last_error_at: float = 0.0


def channel_key(channel: Channel) -> str:
    return f"{channel.provider.name}/{channel.upstream_model}"


@dataclass
class Cooldowns:
    failures: int = 3
    seconds: float = 30.0
    cap: float = MAX_COOLDOWN
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    _states: dict[str, _State] = field(default_factory=dict)
    _turns: dict[str, Iterator[int]] = field(default_factory=dict)

    def _state(self, key: str) -> _State:
        found = self._states.get(key)
        if found is None:
            found = self._states[key] = _State()
        return found

    def _open(self, key: str, now: float) -> bool:
        state = self._states.get(key)
        return state is None or (state.until <= now and not (state.probing and now - state.probe_at < PROBE_TIMEOUT))

    def order(self, channels: Sequence[Channel]) -> list[Channel]:
        """The channels to try, best first: by priority, weighted at random within one, without
        those cooling down (or being probed); if that leaves none, the one free soonest."""
        if len(channels) == 1:  # most models: no order to choose, and no choice when it cools
            return list(channels)
        ranked: list[Channel] = []
        for _, group in itertools.groupby(channels, key=lambda channel: channel.priority):
            ranked += self._weighted(list(group))
        now = self.clock()
        usable = [channel for channel in ranked if self._open(channel_key(channel), now)]
        if usable:
            return usable
        return sorted(ranked, key=lambda channel: self._state(channel_key(channel)).until)[:1]

    def _weighted(self, group: list[Channel]) -> list[Channel]:
        if len(group) == 1:
            return group
        order = []
        while group:
            pick = self.rng.choices(range(len(group)), weights=[channel.weight for channel in group])[0]
            order.append(group.pop(pick))
        return order

    def attempt(self, channel: Channel) -> None:
        """A call is about to try `channel`: if its cooldown has ended, this call is the probe."""
        state = self._state(channel_key(channel))
        state.calls += 1
        now = self.clock()
        if state.until and state.until <= now:
            state.probing, state.probe_at = True, now

    def succeeded(self, channel: Channel) -> None:
        state = self._state(channel_key(channel))
        state.failures, state.strikes, state.until, state.probing = 0, 0, 0.0, False

    def failed(self, channel: Channel, error: str, retry_after: float | None = None) -> None:
        self._fail(self._state(channel_key(channel)), error, retry_after)

    def _fail(self, state: _State, error: str, retry_after: float | None) -> None:
        now = self.clock()
        state.failures += 1
        state.errors += 1
        state.last_error, state.last_error_at = error, now
        if retry_after is not None:
            state.until = now + min(retry_after, self.cap)
        elif state.failures >= self.failures or state.probing:
            state.until = now + min(self.seconds * 2 ** state.strikes, self.cap)
            state.strikes += 1
        else:
            return
        state.failures, state.probing = 0, False

    def key_for(self, provider: Provider) -> str:
        """The next of the provider's keys, skipping those cooling down (all cooling: the one free soonest)."""
        keys = provider.api_keys
        if len(keys) <= 1:
            return keys[0] if keys else ""
        turn = self._turns.setdefault(provider.name, itertools.count())
        start, now = next(turn), self.clock()
        for offset in range(len(keys)):
            key = keys[(start + offset) % len(keys)]
            if self._open(_key_key(provider, key), now):
                return key
        return min(keys, key=lambda key: self._state(_key_key(provider, key)).until)

    def key_refused(self, provider: Provider, key: str, error: str, retry_after: float | None = None) -> None:
        if len(provider.api_keys) > 1:
            state = self._state(_key_key(provider, key))
            state.failures = max(state.failures, self.failures - 1)  # a refused key is out at once
            self._fail(state, error, retry_after)

    def health(self, channels: Sequence[Channel]) -> list[dict[str, object]]:
        """Each channel's state, for operators: ok or cooling down (for how long), its calls and
        errors since this process started, and its last error."""
        now = self.clock()
        report = []
        for channel in channels:
            state = self._states.get(channel_key(channel), _State())
            cooling = state.until > now
            report.append({
                "channel": channel_key(channel), "provider": channel.provider.name, "priority": channel.priority,
                "weight": channel.weight, "state": "cooling_down" if cooling else "probing" if state.probing else "ok",
                "cooling_down_for": round(state.until - now, 1) if cooling else 0, "calls": state.calls,
                "errors": state.errors, "last_error": state.last_error or None,
                "last_error_ago": round(now - state.last_error_at, 1) if state.last_error else None,
            })
        return report


def _key_key(provider: Provider, key: str) -> str:
    # Keys are told apart by position, never by the secret: the state is shown to operators.
    return f"{provider.name}#key{provider.api_keys.index(key)}"


def retry_after(value: bytes | None) -> float | None:
    """Seconds from a Retry-After header given in seconds (an HTTP date is rare from APIs: ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.decode("latin-1").strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86400 else None
