import httpx
from tests.proxy.conftest import usage_rows, money_state

def test_chat(base, account, engine, llm_upstream):
    r = httpx.post(base + "/v1/chat/completions", headers=account.headers,
                   json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi [in:1000] [out:50] [cached:200]"}]})
    print(r.status_code, r.headers, r.text)
    rows = usage_rows(engine, account.id)
    print(rows)
    print(money_state(engine, account.id))
    with httpx.stream("POST", base + "/v1/chat/completions", headers=account.headers,
                   json={"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi [in:1000] [out:50] [cached:200]"}]}) as r:
        print(r.status_code, r.headers)
        print(r.read().decode())
    print(llm_upstream.calls[-1])
    rows = usage_rows(engine, account.id, 2)
    print(rows)
