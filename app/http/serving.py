"""How the web process holds its client connections: uvicorn's httptools protocol, hardened
against slow and idle clients.

Plain uvicorn keeps a connection open for as long as its client likes while the request's
headers or body are still arriving, so a few hundred sockets that never finish (slowloris)
hold their file descriptors indefinitely, and once the process is out of descriptors every
other client fails. Here:

- a request's whole header block must arrive within `header_timeout` of its first byte (of
  the connection, for a first request): a total, so trickling a byte now and then buys nothing;
- a request body may go `body_timeout` without a byte while the server is reading it. Time
  during which the server itself is not reading does not count: uvicorn pauses reading when
  the app has not yet taken what arrived (flow control), and an `Expect: 100-continue` client
  waits for the app's first read before sending. A slow app never gets its client cut;
- past `max_connections` open connections in this process, a new one is answered a short
  `503` and closed, before anything of it is parsed;
- `raise_open_file_limit` lifts the process's soft limit on descriptors to the hard one.

A timed-out connection is aborted; a request the app already has then sees `http.disconnect`
(uvicorn's `connection_lost` marks its cycle disconnected), as for a client that went away.

The cap is ours rather than uvicorn's `limit_concurrency`: that one is checked only once a
request's headers are complete (a connection that never completes them is never refused), it
answers in plain text without `Retry-After`, and it logs a warning for every refusal.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.core.errors import APIError
from app.core.settings import Settings

log = logging.getLogger(__name__)

# Descriptors a web process needs beside its client connections: database pools, the usage
# writer's pipe, log files, images being stored, the broker.
FD_RESERVE = 256
# How long a refused connection stays open after its 503: long enough for the client to read
# the answer (closing while its request is still unread would send a reset, which can destroy
# the 503 in the client's receive buffer before it reads it), short enough to cost little.
REFUSED_LINGER = 2.0
# Refused connections answered and lingering at once, at most: past it, refused ones are cut
# without an answer, so that refusals can't use up the descriptors kept for the rest of the process.
MAX_LINGERING = FD_RESERVE // 4
_lingering = [0]  # in this process (a list: changed in place by the protocol instances)
# Under an attack thousands of connections are timed out or refused; one log line per this
# many seconds says how many.
LOG_INTERVAL = 10.0

_TOO_MANY_BODY = json.dumps(APIError(
    503, "This server has too many open connections; retry in a moment.",
    code="too_many_connections", type="server_error").body()).encode()


@dataclass(frozen=True)
class ConnectionLimits:
    """The slow-client settings one web process serves with: a timeout of 0 is none, and
    `max_connections` is already within the open-file limit (`connection_cap`). Frozen and
    plain so that it pickles into uvicorn's spawned worker processes."""

    header_timeout: float
    body_timeout: float
    max_connections: int
    max_lingering: int = MAX_LINGERING  # refused connections answered at once, at most


class _Phase(enum.Enum):
    HEADERS = "headers"  # waiting for (the rest of) a request's headers
    BODY = "body"  # the request is with the app; its body is still arriving
    IDLE = "idle"  # nothing owed by the client: the app is answering, or keep-alive (uvicorn's timer)


class _Tally:
    """Counts an event and logs it at most once per LOG_INTERVAL, with the count since the last line."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.count = 0
        self.logged_at = float("-inf")

    def add(self, now: float) -> None:
        self.count += 1
        if now - self.logged_at >= LOG_INTERVAL:
            log.warning(self.message, self.count)
            self.count, self.logged_at = 0, now


# Per process, like the cap itself.
_header_timeouts = _Tally("closed %d connection(s) that did not send their request headers in time")
_body_timeouts = _Tally("closed %d connection(s) whose request body stalled")
_refusals = _Tally("refused %d connection(s): too many open connections (MEDIAGATE_MAX_CONNECTIONS)")


class _ReadingFlowControl(FlowControl):
    """uvicorn's flow control, also telling the protocol each time reading is asked to resume:
    the app asked for (more of) the body, or a response ended."""

    def __init__(self, transport: asyncio.Transport, on_resume: Callable[[bool], None]) -> None:
        super().__init__(transport)
        self._on_resume = on_resume

    def resume_reading(self) -> None:
        was_paused = self.read_paused
        super().resume_reading()
        self._on_resume(was_paused)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a header timeout, a body-stall timeout and a connection cap.

    One timer per connection at most: it is armed for the current phase's deadline and, when it
    fires early (the deadline moved because bytes came, or reading was paused), re-arms itself,
    so a body arriving in many chunks costs no timer per chunk.
    """

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, limits: ConnectionLimits) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._phase = _Phase.HEADERS
        self._headers_since = 0.0  # when the current header block began (or reading resumed)
        self._last_read = 0.0  # the body's last byte (or when reading resumed)
        self._awaiting_continue = False  # the client waits for our `100 Continue`
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._refused = False

    # Connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own signature
        cap = self.limits.max_connections
        if cap > 0 and len(self.connections) >= cap:
            if _lingering[0] >= self.limits.max_lingering:
                # A flood past the cap: answering each would hold a descriptor for REFUSED_LINGER
                # seconds, and the reserve for the database and storage with it. Cut it at once.
                _refusals.add(self.loop.time())
                transport.abort()
                return
            self._refuse(transport)
            return
        super().connection_made(transport)
        self.flow = _ReadingFlowControl(transport, self._reading_resumed)
        self._headers_since = self.loop.time()
        self._schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._refused:
            self._refused = False
            _lingering[0] -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped: see REFUSED_LINGER
        super().data_received(data)
        if self._phase is _Phase.BODY:
            self._last_read = self.loop.time()
        self._schedule()

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol takes the transport over, with its own timeouts.
        self._phase = _Phase.IDLE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().handle_websocket_upgrade()

    # Parser callbacks: which phase the connection is in

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _Phase.HEADERS
        self._headers_since = self.loop.time()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._phase = _Phase.BODY
        self._last_read = self.loop.time()
        self._awaiting_continue = self.cycle is not None and self.cycle.waiting_for_100_continue

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = _Phase.IDLE

    # The timer

    def _deadline(self) -> float | None:
        if self._phase is _Phase.HEADERS and self.limits.header_timeout > 0:
            return self._headers_since + self.limits.header_timeout
        if self._phase is _Phase.BODY and self.limits.body_timeout > 0:
            return self._last_read + self.limits.body_timeout
        return None

    def _schedule(self) -> None:
        deadline = self._deadline()
        if deadline is None:
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                return  # it fires first and re-arms for the later deadline then
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer)
        self._timer_at = deadline

    def _server_holds_up(self) -> bool:
        """The client is not to blame for silence: we are not reading (the app has not taken
        what came), or it waits for the `100 Continue` the app's first read sends."""
        if self.flow.read_paused:
            return True
        return self._phase is _Phase.BODY and self.cycle is not None and self.cycle.waiting_for_100_continue

    def _reading_resumed(self, was_paused: bool) -> None:
        # The client's clock restarts when we read again: time spent paused was ours.
        if was_paused or (self._awaiting_continue and not self.cycle.waiting_for_100_continue):
            self._awaiting_continue = False
            self._headers_since = self._last_read = self.loop.time()

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport.is_closing() or (deadline := self._deadline()) is None:
            return
        now = self.loop.time()
        if self._server_holds_up():
            # Look again a full timeout on; reading resuming restarts the clock anyway.
            self._headers_since = self._last_read = now
        elif now >= deadline:
            (_header_timeouts if self._phase is _Phase.HEADERS else _body_timeouts).add(now)
            # abort, not close: close would first flush the write buffer, which a client that
            # does not read keeps full forever.
            self.transport.abort()
            return
        self._schedule()

    # The cap

    def _refuse(self, transport: asyncio.Transport) -> None:
        # Not added to server_state.connections: the cap counts connections being served.
        self._refused = True
        _lingering[0] += 1
        self.transport = transport
        _refusals.add(self.loop.time())
        head = [b"HTTP/1.1 503 Service Unavailable\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n",
                 b"content-length: " + str(len(_TOO_MANY_BODY)).encode() + b"\r\n",
                 b"retry-after: 1\r\n", b"connection: close\r\n\r\n", _TOO_MANY_BODY]
        transport.write(b"".join(head))
        if transport.can_write_eof():
            # The client reads the answer, then EOF, and closes its end; on that EOF asyncio closes
            # ours (uvicorn's eof_received returns None).
            transport.write_eof()
        self._timer = self.loop.call_later(REFUSED_LINGER, transport.abort)  # cancelled if it closes first


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, and return the soft limit
    in force. Child processes inherit it: uvicorn's workers and the embedded Celery worker."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %s to its hard limit %s (%s): each web process "
                    "serves fewer connections", soft, hard, exc)
        return soft
    return hard


def connection_cap(wanted: int, open_files: int) -> int:
    """`wanted` (0: no cap), lowered so that each connection can hold two descriptors (itself and
    an upstream call) within the open-file limit, beside FD_RESERVE for the rest of the process."""
    if open_files == resource.RLIM_INFINITY:
        return wanted
    fits = max(1, (open_files - FD_RESERVE) // 2)
    if wanted > 0 and wanted <= fits:
        return wanted
    log.warning("the open-file limit %d fits %d connections per web process, not %s: serving at most %d",
                open_files, fits, wanted or "unlimited", fits)
    return fits


def limits_for(settings: Settings, open_files: int) -> ConnectionLimits:
    return ConnectionLimits(header_timeout=settings.header_timeout, body_timeout=settings.body_timeout,
                            max_connections=connection_cap(settings.max_connections, open_files))


def http_protocol(limits: ConnectionLimits) -> Callable[..., asyncio.Protocol]:
    """What uvicorn's `http=` takes: it calls it as it would a protocol class. A partial of a
    module-level class pickles by reference, so it reaches the worker processes `--workers N`
    spawns (uvicorn pickles the whole Config into each)."""
    return functools.partial(GuardedHttpToolsProtocol, limits=limits)
