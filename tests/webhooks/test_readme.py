"""The documented receiver example (docs/api.md) verifies a real mediagate delivery, as written."""

from __future__ import annotations

import re
import time
from pathlib import Path

from starlette.testclient import TestClient

from app.webhooks import signing

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_documented_receiver_example_accepts_signed_and_refuses_forged(capsys):
    section = API_DOC.read_text().split("<!-- section:webhooks -->")[1].split("<!-- /section:webhooks -->")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    secret = signing.new_secret()
    namespace: dict = {}
    exec(compile(code.replace('"whsec_..."', repr(secret)), "docs/api.md", "exec"), namespace)
    body = '{"type":"task.completed","timestamp":"2026-01-01T00:00:00Z","data":{"task_id":"media_x",' \
           '"status":"completed","result":{"urls":["http://h/0.png"]}}}'
    headers = {**signing.headers([secret], "msg_readme", int(time.time()), body), "content-type": "application/json"}
    with TestClient(namespace["app"]) as client:
        assert client.post("/hooks/mediagate", content=body, headers=headers).status_code == 204
        forged = body.replace("media_x", "media_y")
        assert client.post("/hooks/mediagate", content=forged, headers=headers).status_code == 400
    assert "task.completed media_x" in capsys.readouterr().out
