"""Forward a prepared call upstream and stream the answer back byte for byte, metering as it passes.

`ProxyResponse` is an ASGI response: it makes the upstream request when the
server runs it, so it can watch the client's connection the whole time. A
client that goes away cancels the upstream request at once, whether the
gateway is waiting for the upstream's headers or in the middle of a stream.

Nothing here waits on the database: the finished call goes to the usage
recorder, which settles the hold and writes the record in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from app.core.catalog import Channel
from app.core.errors import APIError
from app.proxy import upstream
from app.proxy.calls import Call
from app.proxy.channels import FAILOVER_STATUSES, KEY_REFUSED, retry_after
from app.proxy.client import Response, UpstreamError
from app.proxy.formats import read_answer, stream_meter
from app.proxy.meters import Meter
from app.proxy.pricing import Usage, cost, estimated
from app.proxy.recorder import Entry
from app.proxy.services import LLMServices

log = logging.getLogger(__name__)
# How long a call runs before the gateway watches for its client's disconnect. A client that
# leaves earlier is noticed then, so its upstream request is closed at most this late.
WATCH_AFTER = 0.02


class ProxyResponse:
    def __init__(self, call: Call, llm: LLMServices, family: str):
        self.call = call
        self.llm = llm
        self.family = family  # the error shape of the gateway's own errors
        self.status: int | None = None
        self.raw_usage: dict | None = None
        self.final = False  # raw_usage is the upstream's last word (not a running count)
        self.text_bytes = 0  # generated text seen, for an estimate when the final usage never comes
        self.streamed = False  # the answer was metered as a stream
        self.ttfb: float | None = None
        self.started = False  # the response's head went out
        self.done = False  # ... and its last byte
        self.answered = False  # the upstream's head came: it is generating, and billing
        self.disconnected = False
        self._task: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self.channel: Channel | None = None  # the channel that answered (or was tried last)
        self.attempts = 0  # channels tried

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = self._task = asyncio.current_task()
        assert task is not None
        # A call that ends within WATCH_AFTER needs no watcher task: making and cancelling one
        # costs more than anything else the gateway adds to a fast call.
        start_watching = asyncio.get_running_loop().call_later(WATCH_AFTER, self._start_watching, receive, task)
        try:
            await self._forward(scope, receive, send)
        except asyncio.CancelledError:
            if not self.disconnected:
                raise
            task.uncancel()  # our own cancellation: the client left, which is not an error
        finally:
            self.done = True
            start_watching.cancel()
            if self._watcher is not None:
                self._watcher.cancel()
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            self._record()

    def _start_watching(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        if not self.done:
            self._watcher = asyncio.ensure_future(self._watch(receive, task))

    async def _watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._client_left()

    def _client_left(self) -> None:
        """Before the upstream answered, its request is closed at once (nothing was generated
        that the gateway could meter). After, the provider is generating and bills for it: the
        upstream is read on, sending nothing, until its usage comes or `drain_seconds` pass."""
        if self.done or self.disconnected:
            return
        self.disconnected = True
        drain = self.llm.drain_seconds
        if self.answered and drain > 0 and self._task is not None:
            self._drain_timer = asyncio.get_running_loop().call_later(drain, self._task.cancel)
        elif self._task is not None:
            self._task.cancel()

    async def _send(self, send: Send, message: Message) -> None:
        """To the client, unless it left; a server that raises for a client gone (ASGI 2.4) says so."""
        if self.disconnected:
            return
        try:
            await send(message)
        except OSError:
            self._client_left()

    async def _answer(self) -> Response:
        """The upstream's answer, from the first channel that gives one: a channel that can't be
        reached, says nothing before its head, or answers a FAILOVER_STATUSES status is left for
        the next (at most `failover_attempts` tries); a provider that refuses one of several keys
        is tried again with the next. Nothing has been sent to the client yet, so moving on costs
        it nothing; the last try's answer, whatever it is, goes back as is. Raises the last
        connection error when no channel answered at all."""
        call, llm = self.call, self.llm
        cooldowns = llm.cooldowns
        order = cooldowns.order(call.model.channels)
        place = 0
        refused: dict[str, int] = {}  # the keys of each provider refused in this call
        for number in range(1, llm.failover_attempts + 1):
            channel = order[place]
            provider = channel.provider
            key = cooldowns.key_for(provider)
            url, headers, body = call.request(channel, key)
            self.channel, self.attempts = channel, number
            cooldowns.attempt(channel)
            try:
                response = await llm.pool(provider).post(url, headers, body)
            except (UpstreamError, TimeoutError, OSError) as exc:
                cooldowns.failed(channel, type(exc).__name__)
                log.warning("upstream %s for %s failed before answering (try %d): %r", channel.name, call.id,
                            number, exc)
                place += 1
                if place >= len(order) or number == llm.failover_attempts:
                    raise
                continue
            status = response.status
            if status not in FAILOVER_STATUSES:
                cooldowns.succeeded(channel)
                return response
            wait = retry_after(response.header(b"retry-after"))
            refused[provider.name] = refused.get(provider.name, 0) + (status in KEY_REFUSED)
            if status in KEY_REFUSED and refused[provider.name] < len(provider.api_keys):
                # One of several keys refused: the provider's next key, on the same channel.
                cooldowns.key_refused(provider, key, f"HTTP {status}", wait)
            else:
                cooldowns.failed(channel, f"HTTP {status}", wait)
                place += 1
            if place >= len(order) or number == llm.failover_attempts:
                return response
            log.warning("upstream %s for %s answered %d (try %d); trying again", channel.name, call.id, status, number)
            response.close()
        raise AssertionError("the loop returns or raises")  # pragma: no cover

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = self.call
        response = None
        try:
            response = await self._answer()
            self.answered = True
            self.status = response.status
            headers = upstream.response_headers(response.raw_headers, call.id)
            content_type = response.header(b"content-type") or b""
            # Metered by what the upstream sent, whatever the request said: an event stream is
            # read as one (a Gemini stream without alt=sse is a JSON array, read as it comes).
            sse = b"event-stream" in content_type
            if 200 <= response.status < 300 and (sse or (call.stream and call.format.model_in_path)):
                await self._stream(response, headers, send, sse)
            else:
                body = await response.read()
                await self._whole(response.status, headers, body, send)
        except (UpstreamError, TimeoutError, OSError) as exc:
            if self.started:
                # A server that raises on sending to a client who left (ASGI 2.4): a disconnect.
                self.disconnected = not self.done
                return
            # Nothing was sent yet: answer with the gateway's own error, in the client's format.
            timed_out = isinstance(exc, TimeoutError)
            self.status = None
            error = APIError(504 if timed_out else 502,
                             "The upstream provider " + ("did not answer in time" if timed_out else
                                                         "could not be reached or broke off") +
                             "; nothing was charged.", code="upstream_timeout" if timed_out else "upstream_error")
            self.done = self.started = True
            await error.response(self.family)(scope, receive, send)
        finally:
            if response is not None:
                if self.done and not self.disconnected:
                    response.release()
                else:
                    response.close()  # half read: the connection can't be reused

    async def _whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, send: Send) -> None:
        if 200 <= status < 300:
            self.raw_usage, self.text_bytes = read_answer(self.call.format, body)
            self.final = self.raw_usage is not None
        headers.append((b"content-length", str(len(body)).encode()))
        self.started = True
        if self.disconnected:
            return  # read on for its usage after the client left: nobody to send it to
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            self.ttfb = time.perf_counter()
            self.done = True
            await send({"type": "http.response.body", "body": body})
        except OSError:  # a server that raises for a client gone (ASGI 2.4)
            self._client_left()

    async def _stream(self, response: Response, headers: list[tuple[bytes, bytes]], send: Send, sse: bool) -> None:
        call = self.call
        # The gateway asked for the usage chunk: it meters it and hides it from the client.
        strip = call.format.strip_meter
        stripper = strip() if strip is not None and call.strip_usage and sse else None
        meter: Meter = stripper if stripper is not None else stream_meter(call.format, sse=sse)
        self.streamed = True
        self.started = True
        await self._send(send, {"type": "http.response.start", "status": response.status, "headers": headers})
        message = {"type": "http.response.body", "body": b"", "more_body": True}
        tail = b""
        try:
            async for chunk in response.iter_chunks():
                if self.ttfb is None:
                    self.ttfb = time.perf_counter()
                if stripper is not None:
                    chunk = stripper.filter(chunk)
                if chunk and not self.disconnected:
                    message["body"] = chunk
                    try:
                        await send(message)  # first to the client, then to the meter
                    except OSError:  # a server that raises for a client gone (ASGI 2.4)
                        self._client_left()
                if stripper is None:
                    meter.feed(chunk)
                if self.disconnected and meter.final:
                    return  # what the gateway read on for, after the client left; the rest goes unread
        except UpstreamError as exc:
            # The upstream broke off mid-stream. Charge what it reported so far, and end the
            # client's response the same way (without its last chunk), so its SDK raises too.
            log.warning("upstream %s broke off the stream of %s: %r", self.channel.name if self.channel else "?",
                        call.id, exc)
            return
        finally:
            # Also on a disconnect (cancellation): what was metered so far is what is charged.
            if stripper is not None:
                tail = stripper.flush()
            else:
                meter.finish()
            self.raw_usage, self.final, self.text_bytes = meter.raw, meter.final, meter.text_bytes
        self.done = not self.disconnected
        await self._send(send, {"type": "http.response.body", "body": tail, "more_body": False})

    def _usage(self) -> tuple[Usage | None, bool]:
        """What the call is charged for, and whether that is an estimate: the upstream's final count;
        else, for any answer the upstream began with a 2xx (the client left, the upstream broke off
        or never reported), an estimate from what it reported and generated: the provider bills the
        input of a call it answered even when no text came (a model thinking); else nothing."""
        call, raw = self.call, self.raw_usage
        reported = call.format.normalize(raw) if raw is not None else None
        if reported is not None and self.final:
            return reported, False
        if self.status is not None and 200 <= self.status < 300:
            return estimated(reported, call.input_estimate, self.text_bytes), True
        return None, False

    def _record(self) -> None:
        call = self.call
        usage, guessed = self._usage()
        ended = time.perf_counter()
        # What to release in the database: the call's hold, unless it went with a lost lease.
        held = self.llm.holds.finish(call.principal.account_id, call.held) if call.held else 0
        self.llm.recorder.record(Entry(
            id=call.id, account_id=call.principal.account_id, api_key_id=call.principal.key_id,
            model=call.model.name, api_format=call.format.api, stream=call.stream or self.streamed,
            input_tokens=usage.input_tokens if usage else 0, output_tokens=usage.output_tokens if usage else 0,
            cached_tokens=usage.cached_tokens if usage else 0,
            reasoning_tokens=usage.reasoning_tokens if usage else 0,
            usage_reported=self.raw_usage is not None, cost=cost(call.model, usage) if usage else 0,
            upstream_status=self.status, latency_ms=round((ended - call.started) * 1000),
            ttfb_ms=round((self.ttfb - call.started) * 1000) if self.ttfb is not None else None,
            client_disconnected=self.disconnected, created_at=call.created_at, held=held,
            usage_estimated=guessed, channel=self.channel.name if self.channel else None, attempts=self.attempts,
            owner=self.llm.holds.owner,
        ))
