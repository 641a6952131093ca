"""Money is an integer count of nano-dollars (1e-9 USD) everywhere but at the edges.

A nano-dollar is fine enough for per-token LLM prices (a $0.075 / 1M-token price
is 75 units a token) and a signed 64-bit column still holds $9 billion.
The API renders amounts as decimal strings with 5 decimals, as the docs do.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

UNITS_PER_USD = 10**9
MAX_UNITS = 2**63 - 1  # what the signed 64-bit money columns hold
_DISPLAY = Decimal("0.00001")


def from_usd(value: str | int | Decimal) -> int:
    """Parse a USD amount ("0.012", 10, Decimal) into units; floats are refused."""
    if isinstance(value, float) or isinstance(value, bool):
        raise TypeError("money must not be a float; write it as a string")
    try:
        amount = Decimal(str(value)) * UNITS_PER_USD
    except ArithmeticError as exc:  # InvalidOperation, and Overflow past the exponent's range
        raise ValueError(f"not an amount: {value!r}") from exc
    if not amount.is_finite():  # Infinity and NaN parse as Decimals, but are no amount
        raise ValueError(f"not an amount: {value!r}")
    if abs(amount) > MAX_UNITS:  # also keeps int() off "1e999999999", which would take minutes
        raise ValueError(f"{value!r} is more than a balance can hold")
    if amount != amount.to_integral_value():
        raise ValueError(f"{value!r} is finer than a nano-dollar")
    return int(amount)


def to_decimal(units: int) -> Decimal:
    return Decimal(units) / UNITS_PER_USD


def render(units: int) -> str:
    """Units as the API's USD string: 12_000_000 -> "0.01200"."""
    return str(to_decimal(units).quantize(_DISPLAY, rounding=ROUND_HALF_EVEN))
