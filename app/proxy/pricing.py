"""What a call costs: tokens in one shape for every format, priced exactly in nano-dollars."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from app.core.catalog import Model

_TOKENS_PER_MTOK = 1_000_000
# When the upstream's usage never comes, output is estimated from the generated text: at least a
# token per this many bytes of it (English runs about 4 characters a token; other scripts fewer).
BYTES_PER_TOKEN = 4


@dataclass
class Usage:
    """Tokens as the upstream reported them, in one shape for every format."""

    input_tokens: int = 0  # every prompt token, cached ones and cache writes included
    output_tokens: int = 0  # every generated token, reasoning included
    cached_tokens: int = 0  # prompt tokens read from the provider's cache (a part of input_tokens)
    reasoning_tokens: int = 0  # tokens spent thinking (a part of output_tokens)
    cache_write_5m_tokens: int = 0  # Anthropic: prompt tokens written to a 5-minute cache
    cache_write_1h_tokens: int = 0  # Anthropic: prompt tokens written to a 1-hour cache


def cost(model: Model, usage: Usage) -> int:
    """What `usage` costs at `model`'s prices, in nano-dollars, rounded up once.

    Cached input is charged at `cached_input_per_mtok` (the input price when the
    catalog gives none). Anthropic cache writes cost 1.25x (5 minutes) or 2x
    (1 hour) the input price, as Anthropic bills them.
    """
    cached = min(usage.cached_tokens, usage.input_tokens)
    cached_price = model.input_per_mtok if model.cached_input_per_mtok is None else model.cached_input_per_mtok
    # Everything times 4 so the 1.25x of 5-minute cache writes stays an integer.
    quarter_units = 4 * ((usage.input_tokens - cached) * model.input_per_mtok + cached * cached_price
                         + usage.output_tokens * model.output_per_mtok)
    quarter_units += (usage.cache_write_5m_tokens + 4 * usage.cache_write_1h_tokens) * model.input_per_mtok
    return -(-quarter_units // (4 * _TOKENS_PER_MTOK))


def estimate(model: Model, input_tokens: int, output_tokens: int) -> int:
    """The most a request can cost: the hold taken before forwarding it."""
    return cost(model, Usage(input_tokens=input_tokens, output_tokens=output_tokens))


def estimated(reported: Usage | None, input_tokens: int, text_bytes: int) -> Usage:
    """The usage to charge when the upstream's final count never came: what it reported so far,
    the input as the hold estimated it (`input_tokens`) unless reported, and the output at least a
    token per BYTES_PER_TOKEN bytes of the text that was generated."""
    usage = dataclasses.replace(reported) if reported is not None else Usage()
    usage.input_tokens = usage.input_tokens or input_tokens
    usage.output_tokens = max(usage.output_tokens, -(-text_bytes // BYTES_PER_TOKEN))
    return usage
