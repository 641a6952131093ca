"""`mediagate serve` on the embedded default, as the README's quick start runs it: no database
URL, no broker URL, no other service. It migrates SQLite, makes the development account, starts
the embedded broker and worker, and completes an image task. Runs in every mode (CI too)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.servers import free_port


def _start(tmp_path):
    """`mediagate serve` on a free port: (process, base URL, log), or None if the port was taken
    between choosing it and binding it (another socket can claim a free port meanwhile)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAGATE_")}
    env.update({"MEDIAGATE_DATA_DIR": str(tmp_path / "data"), "MEDIAGATE_PUBLIC_URL": f"http://127.0.0.1:{port}"})
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        env.pop(name, None)
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w+b")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            log.close()
            if b"address already in use" in log_path.read_bytes():
                return None
            raise AssertionError("serve did not start:\n" + log_path.read_text())
        if time.monotonic() > deadline:
            raise AssertionError("serve did not start:\n" + log_path.read_text())
        time.sleep(0.2)


@pytest.fixture
def served(tmp_path):
    for _ in range(3):
        started = _start(tmp_path)
        if started:
            break
    else:
        raise AssertionError("no free port could be bound in 3 tries")
    proc, base, log = started
    try:
        yield base, tmp_path / "serve.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_quick_start_serves_and_completes_a_task_with_no_other_service(served):
    base, log_path = served
    key = re.search(r"llm_[A-Za-z0-9_-]{32,}", log_path.read_text()).group(0)
    headers = {"Authorization": f"Bearer {key}"}
    api = base + "/llm-api"
    assert httpx.get(api + "/v1/balance", headers=headers).json() == {"balance": "10.00000", "currency": "USD"}
    r = httpx.post(api + "/v1/images/generations", headers=headers,
                   json={"model": "local-image", "prompt": "A futuristic cityscape at sunset", "size": "16:9"})
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    deadline = time.monotonic() + 60
    while (task := httpx.get(f"{api}/v1/tasks/{task_id}", headers=headers).json())["status"] in ("pending",
                                                                                               "processing"):
        assert time.monotonic() < deadline, task
        time.sleep(0.2)
    assert task["status"] == "completed", task
    image = Image.open(io.BytesIO(httpx.get(task["result"]["urls"][0]).content))
    assert image.size == (1024, 576)
    assert httpx.get(api + "/v1/balance", headers=headers).json()["balance"] == "9.99900"
    health = httpx.get(base + "/healthz").json()
    assert health == {"status": "ok", "database": "ok", "broker": "ok", "usage_writer": "ok"}


def _readme_block(language: str, after: str, doc: str = "README.md") -> str:
    text = (ROOT / doc).read_text()
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start:text.index("```", start)]


def test_the_readme_curl_and_python_examples_work_verbatim(served, tmp_path):
    base, log_path = served
    key = re.search(r"llm_[A-Za-z0-9_-]{32,}", log_path.read_text()).group(0)
    # The quick start shows what the first start prints: only the key differs.
    printed = re.escape(_readme_block("", "prints its API key once:"))
    assert re.search(printed.replace(re.escape("llm_..."), "llm_[A-Za-z0-9_-]{32,}"), log_path.read_text())
    env = {**os.environ, "KEY": key}
    # Only the address differs from the README: this server listens on a free port.
    shell = _readme_block("sh", "### Submit and poll with curl").replace("http://127.0.0.1:8000", base)
    shell = shell.replace("export KEY=llm_...", "true")
    out = subprocess.run(["bash", "-e", "-c", shell], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"status":"pending"' in out.stdout.replace(" ", "")
    assert '"status":"completed"' in out.stdout.replace(" ", "")
    assert '"balance":"9.99900"' in out.stdout.replace(" ", "")

    python = _readme_block("python", "### Python\n", "docs/api.md").replace("http://127.0.0.1:8000", base)
    out = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Task submitted: media_" in out.stdout and "charge: $0.00100" in out.stdout
    assert "Image URLs: ['" + base + "/files/media_" in out.stdout
