from decimal import Decimal

import pytest

from app.core import money


def test_parse_and_render_exact_amounts():
    assert money.from_usd("0.012") == 12_000_000
    assert money.from_usd(10) == 10 * money.UNITS_PER_USD
    assert money.from_usd(Decimal("2.5")) == 2_500_000_000
    assert money.render(12_000_000) == "0.01200"
    assert money.render(9_988_000_000) == "9.98800"
    assert money.render(0) == "0.00000"
    assert money.render(-12_000_000) == "-0.01200"


def test_floats_and_sub_unit_amounts_are_refused():
    with pytest.raises(TypeError):
        money.from_usd(0.1)
    with pytest.raises(ValueError):
        money.from_usd("0.0000000001")
    with pytest.raises(ValueError):
        money.from_usd("ten")
