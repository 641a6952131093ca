import pytest

from app.core import catalog, money
from app.core.catalog import CatalogError

BASE = """
[providers.openai]
format = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"

[[models]]
name = "gpt-image-2"
provider = "openai"
api = "image"
prices = { "1k" = "0.012", "2k" = "0.024", "4k" = "0.048" }
"""


def test_parses_the_documented_schema():
    offered = catalog.parse(BASE + 'sizes = ["1:1", "3:2"]\nresolutions = ["1k", "2k"]\n',
                            {"OPENAI_API_KEY": "sk-1"})
    model = offered.get("gpt-image-2", "image")
    assert model.provider.api_key == "sk-1" and model.upstream_model == "gpt-image-2"
    assert model.prices["1k"] == money.from_usd("0.012")
    assert model.sizes == ("1:1", "3:2") and model.resolutions == ("1k", "2k")
    assert offered.get("gpt-image-2", "chat") is None


def test_decimal_numbers_are_exact_not_floats():
    text = BASE.replace('"1k" = "0.012"', '"1k" = 0.1')
    assert catalog.parse(text, {}).models["gpt-image-2"].prices["1k"] == 100_000_000


@pytest.mark.parametrize("text, needle", [
    (BASE + 'colour = "red"\n', "unknown key 'colour'"),
    (BASE.replace('prices = { "1k" = "0.012", "2k" = "0.024", "4k" = "0.048" }', ""), "need prices"),
    (BASE.replace(', "4k" = "0.048"', ""), "no price for resolution '4k'"),
    (BASE.replace('provider = "openai"', 'provider = "nobody"'), "provider 'nobody' is not defined"),
    (BASE.replace('format = "openai"', 'format = "ftp"'), "format must be one of"),
    (BASE + 'sizes = ["7:3"]\n', "unknown size '7:3'"),
    (BASE.replace("[providers.openai]", "[providers.openai]\ncolour = 1"), "providers.openai: unknown key"),
    (BASE + "[[models]]\nname = 'gpt-4o'\nprovider = 'openai'\napi = 'chat'\n", "input_per_mtok is required"),
    ("[[models]\n", "catalog"),
])
def test_mistakes_stop_startup_with_a_message_naming_them(text, needle):
    with pytest.raises(CatalogError) as info:
        catalog.parse(text, {})
    assert needle in str(info.value)


def test_builtin_catalog_offers_local_and_only_providers_with_keys():
    without = catalog.load(None, {})
    assert [m.name for m in without.of_api("image")] == ["local-image"]
    assert without.of_api("chat") == []
    with_openai = catalog.load(None, {"OPENAI_API_KEY": "sk-x"})
    assert {"gpt-image-2", "gpt-4o", "local-image"} <= set(with_openai.models)
    assert "claude-sonnet-4-6" not in with_openai.models


def test_missing_catalog_file_is_named(tmp_path):
    with pytest.raises(CatalogError, match="nothere.toml"):
        catalog.load(tmp_path / "nothere.toml", {})


def test_the_built_in_catalog_offers_gpt5_on_chat_and_responses():
    from app.core.catalog import load

    catalog = load(None, {"OPENAI_API_KEY": "sk-x"})
    assert catalog.get("gpt-5.4", "chat") is not None and catalog.get("gpt-5.4", "responses") is not None
    assert catalog.get("gpt-5.4", "chat").provider.api_keys == ("sk-x",)
