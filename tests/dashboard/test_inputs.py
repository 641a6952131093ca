"""No input a dashboard page or form takes gets a 5xx (the API's routes: tests/test_inputs.py)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import example, given

from tests.dashboard.conftest import csrf_of, sign_in
from tests.test_inputs import EDGE_CURSOR, PROPERTY, assert_no_5xx, cursor_text, url_text


@pytest.fixture
def admin_page(web, make_user):
    admin = make_user(admin=True)
    assert sign_in(web, admin).status_code == 303
    return admin, csrf_of(web.get("/dashboard/keys").text)


@PROPERTY
@given(since=url_text, until=url_text, model=url_text, key=url_text, before=cursor_text, status=url_text,
       task_id=url_text, q=url_text, index=url_text)
@example(since="9999-12-31", until="9999-12-31", model="\x00", key="9" * 30, before="\x00", status="",
         task_id="\x00", q="\x00", index="9" * 5000)
@example(since="", until="", model="", key="", before=EDGE_CURSOR, status="", task_id="x", q="", index="0")
def test_dashboard_pages(web, admin_page, since, until, model, key, before, status, task_id, q, index):
    filters = {"from": since, "to": until, "model": model, "key": key, "before": before}
    for path, params in (("/dashboard/usage", filters), ("/dashboard/usage.csv", filters),
                         ("/dashboard/tasks", {"status": status, "before": before}), ("/dashboard/admin", {"q": q}),
                         ("/dashboard/", {})):
        assert_no_5xx(web.get(path, params=params))
    task = quote(task_id, safe="")
    assert_no_5xx(web.get(f"/dashboard/tasks/{task}"))
    assert_no_5xx(web.get(f"/dashboard/tasks/{task}/thumb/{quote(index, safe='')}.webp"))


@PROPERTY
@given(key_id=url_text, account_id=url_text, amount=url_text, note=url_text, name=url_text)
@example(key_id="9" * 20, account_id="9" * 20, amount="Infinity", note="", name="")
@example(key_id="²", account_id="²", amount="1e999999999", note="\x00", name="\x00")
@example(key_id="1", account_id="1", amount="sNaN", note="", name="a")
def test_dashboard_forms(web, admin_page, key_id, account_id, amount, note, name):
    _, csrf = admin_page
    assert_no_5xx(web.post(f"/dashboard/keys/{quote(key_id, safe='')}/revoke", data={"csrf": csrf},
                           follow_redirects=False))
    assert_no_5xx(web.post("/dashboard/admin/topup", data={"csrf": csrf, "account_id": account_id,
                                                          "amount": amount, "note": note}, follow_redirects=False))
    assert_no_5xx(web.post("/dashboard/keys", data={"csrf": csrf, "name": name}, follow_redirects=False))
