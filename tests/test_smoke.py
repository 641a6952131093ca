from tests.conftest import wait_for_task


def test_submit_and_complete_on_local_backend(client, worker, account):
    r = client.post("/llm-api/v1/images/generations", headers=account.headers,
                    json={"model": "local-image", "prompt": "a lighthouse", "size": "16:9"})
    assert r.status_code == 202, r.text
    task = wait_for_task(client, account.headers, r.json()["task_id"])
    assert task["status"] == "completed", task
