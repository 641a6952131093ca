"""The documented LLM examples work as written against a local gateway: the README's "Call an
LLM" and the integration examples of docs/api.md.

Every example is read from the file itself. Only the host (`http://127.0.0.1:8000`) and the
key placeholder are replaced, by the test gateway's address and a funded account's key. Hermes
Agent and OpenClaw are not installed here: their configs are read as the tools read them
(the rules the hosted service's documentation gives) and called with the SDK each tool uses.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import anthropic
import openai
import yaml

from app.core import money
from tests.fakes.llm import TEXT
from tests.proxy.conftest import money_state, usage_rows

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
API_DOC = ROOT / "docs" / "api.md"
HOST = "http://127.0.0.1:8000"
PLACEHOLDER = "llm_YOUR_API_KEY"


def subsection(title: str) -> str:
    section = API_DOC.read_text().split("<!-- section:llm -->")[1].split("<!-- /section:llm -->")[0]
    return section.split(f"\n### {title}\n")[1].split("\n### ")[0]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def local(text: str, gateway, key: str) -> str:
    assert HOST in text  # the example still names the host this test replaces
    return text.replace(HOST, gateway.url).replace(PLACEHOLDER, key)


def check_records(engine, account, expected: list[tuple[str, str, bool]]) -> None:
    """One usage record per call, each metered and charged, and the money adding up."""
    records = usage_rows(engine, account.id, len(expected))
    assert sorted((r.model, r.api_format, r.stream) for r in records) == sorted(expected)
    assert all(r.usage_reported and r.upstream_status == 200 and r.cost > 0 for r in records)
    balance, _, ledger_sum = money_state(engine, account.id)
    assert balance == money.from_usd("10") - sum(r.cost for r in records) == ledger_sum


def test_python_sdk_examples(gateway, account, engine, capsys):
    examples = blocks(subsection("Python SDKs"), "python")
    assert len(examples) == 3  # OpenAI (chat and responses), Anthropic, Google
    for code in examples:
        exec(compile(local(code, gateway, account.key), "docs/api.md", "exec"), {})
    # Each of the four calls prints the whole text: the streams chunk by chunk.
    assert capsys.readouterr().out.count(TEXT) == 4
    check_records(engine, account, [("gpt-4o", "chat", True), ("gpt-5.4", "responses", False),
                                    ("claude-sonnet-4-6", "messages", False),
                                    ("gemini-2.5-flash", "gemini", True)])


def hermes_call(model: dict) -> str:
    """One call as Hermes Agent makes it from its `model:` settings."""
    if model["base_url"].endswith("/anthropic"):  # Hermes then uses the Anthropic SDK
        client = anthropic.Anthropic(api_key=model["api_key"], base_url=model["base_url"])
        return client.messages.create(model=model["default"], max_tokens=1024,
                                      messages=[{"role": "user", "content": "Hello"}]).content[0].text
    client = openai.OpenAI(api_key=model["api_key"], base_url=model["base_url"])
    if model["default"].startswith("gpt-5"):  # Hermes switches to the Responses API for gpt-5 models
        return client.responses.create(model=model["default"], input="Hello").output_text
    return client.chat.completions.create(model=model["default"],
                                          messages=[{"role": "user", "content": "Hello"}]).choices[0].message.content


def test_hermes_configs(gateway, account, engine):
    configs = [yaml.safe_load(local(block, gateway, account.key))["model"]
               for block in blocks(subsection("Hermes Agent"), "yaml")]
    assert [config["provider"] for config in configs] == ["custom"] * 3
    for config in configs:
        assert hermes_call(config) == TEXT
    check_records(engine, account, [("gpt-4o", "chat", False), ("gpt-5.4", "responses", False),
                                    ("claude-sonnet-4-6", "messages", False)])


def test_openclaw_config(gateway, account, engine, llm_upstream):
    config = json.loads(local(blocks(subsection("OpenClaw"), "json")[0], gateway, account.key))
    called = []
    for provider in config["providers"]:
        key = provider["authProfiles"][0]["apiKey"]
        for model in provider["models"]:
            if provider["api"] == "anthropic":
                client = anthropic.Anthropic(api_key=key, base_url=provider["baseUrl"])
                text = client.messages.create(model=model, max_tokens=1024,
                                              messages=[{"role": "user", "content": "Hello"}]).content[0].text
                called.append((model, "messages", False))
            else:
                assert provider["api"] == "openai-completions"
                client = openai.OpenAI(api_key=key, base_url=provider["baseUrl"])
                text = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hello"}]).choices[0].message.content
                called.append((model, "chat", False))
            assert text == TEXT
    assert [model for model, _, _ in called] == ["gpt-4o", "deepseek-r1", "qwen-max", "claude-sonnet-4-6"]
    check_records(engine, account, called)


def test_curl_examples(gateway, account, engine, tmp_path):
    script = blocks(subsection("curl"), "sh")[0]
    assert script.startswith(f"BASE={HOST}/llm-api\n")
    done = subprocess.run(["sh", "-e", "-c", local(script, gateway, account.key)], cwd=tmp_path,
                          env={"KEY": account.key, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # The streams are server-sent events; the whole answers carry the text as one string.
    assert out.count("data: ") >= 4 and out.count(json.dumps(TEXT)) == 2
    check_records(engine, account, [("gpt-4o", "chat", True), ("gpt-5.4", "responses", False),
                                    ("claude-sonnet-4-6", "messages", False),
                                    ("gemini-2.5-flash", "gemini", True)])
    # The usage listing (the last thing printed), filtered to gpt-4o: the one streamed chat call.
    listing, _ = json.JSONDecoder().raw_decode(out[out.rindex('{"object":"list"'):])
    assert [(row["model"], row["stream"]) for row in listing["data"]] == [("gpt-4o", True)]
    # The CSV export of a month long past: its header alone.
    csv_lines = (tmp_path / "usage.csv").read_text().splitlines()
    assert len(csv_lines) == 1 and csv_lines[0].startswith("id,")



def test_readme_call_an_llm(gateway, account, engine, capsys, monkeypatch, tmp_path):
    """The README's first LLM call: the OpenAI SDK with the key in $KEY, then curl with $BASE and
    $KEY as its image example sets them."""
    part = README.read_text().split("\n### Call an LLM\n")[1].split("\n## ")[0]
    (code,) = blocks(part, "python")
    monkeypatch.setenv("KEY", account.key)
    exec(compile(local(code, gateway, account.key), "README.md", "exec"), {})
    assert capsys.readouterr().out == TEXT + "\n"
    (script,) = blocks(part, "sh")
    done = subprocess.run(["sh", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"KEY": account.key, "BASE": gateway.url + "/llm-api", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("data: ") >= 2 and "[DONE]" in done.stdout  # a stream of server-sent events
    check_records(engine, account, [("gpt-4o", "chat", False), ("gpt-4o", "chat", True)])
