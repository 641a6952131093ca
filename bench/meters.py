"""Microseconds a meter spends per chunk of each format's stream, as the passthrough feeds it.

    python -m bench.meters [--rounds 2000]

Each format's fake stream (tests/fakes/llm.py, 20 text deltas) is fed event by event, the
usage read at the end, many times over; it prints the time per chunk. `--no-text` feeds the
same streams with text counting off (as the meters were before they counted text for estimates),
for the difference counting makes.
"""

from __future__ import annotations

import argparse
import time

from app.proxy.formats import FORMATS, stream_meter
from tests.fakes.llm import Plan, chat_events, gemini_events, messages_events, responses_events

PLAN = Plan(b"[in:1000] [out:50] [chunks:20]")
STREAMS = {
    "chat": chat_events(PLAN, "gpt-4o", include_usage=True),
    "responses": responses_events(PLAN, "gpt-5.4"),
    "messages": messages_events(PLAN, "claude"),
    "gemini": gemini_events(PLAN, "gemini", sse=True),
}


def per_chunk(api: str, rounds: int, count_text: bool) -> float:
    events = STREAMS[api]
    started = time.perf_counter()
    for _ in range(rounds):
        meter = stream_meter(FORMATS[api], sse=True, strip=False)
        if not count_text:
            meter._count = lambda data, end: None  # type: ignore[attr-defined]  # noqa: SLF001
        for event in events:
            meter.feed(event)
        meter.finish()
    return (time.perf_counter() - started) / (rounds * len(events)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    for api in STREAMS:
        counted, bare = per_chunk(api, args.rounds, True), per_chunk(api, args.rounds, False)
        print(f"{api:10} {counted:5.2f} us/chunk counting text, {bare:5.2f} without ({len(STREAMS[api])} chunks)")


if __name__ == "__main__":
    main()
