"""Shutdown and security of a real `gpt2mh serve` process:

- SIGTERM under load: /ready turns 503, new requests get 503, every accepted request is answered in
  full, the process exits 0;
- past --drain-timeout the requests still running get an error response (not a dropped connection);
- --api-key / GPT2MH_API_KEY: 401 everywhere but /health, the openai client with the key works;
- a non-loopback bind without a key warns."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
from helpers import Server, events

LONG = {"heads": ["pos"], "min_new_tokens": 200, "max_new_tokens": 200}


def client_loop(url: str, k: int, outcomes: list, stop: threading.Event) -> None:
    """Requests, plain and streamed in turn, each on a new connection, until the server refuses one."""
    n = 0
    while not stop.is_set():
        body = {"inputs": [f"{k}番目の{n}回目の文。"], "max_new_tokens": 16, "stream": n % 2 == 1}
        try:
            if body["stream"]:
                with httpx.stream("POST", url + "/v1/generate", json=body, timeout=60) as r:
                    got = events(r) if r.status_code == 200 else [r.read() and r.json()]
                    ok = r.status_code != 200 or got[-1].get("done") is True
            else:
                r = httpx.post(url + "/v1/generate", json=body, timeout=60)
                ok = r.status_code != 200 or len(r.json()["results"]) == 1
            outcomes.append((r.status_code, ok))
            if r.status_code != 200:
                return
        except httpx.ConnectError:  # not accepted: the server had closed its socket
            outcomes.append(("refused", True))
            return
        except httpx.HTTPError as e:  # accepted and dropped: what must never happen
            outcomes.append((repr(e), False))
            return
        n += 1


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(checkpoint, tmp_path):
    server = Server(checkpoint, tmp_path, "--drain-timeout", "60")
    outcomes, stop = [], threading.Event()
    clients = [threading.Thread(target=client_loop, args=(server.url, k, outcomes, stop)) for k in range(8)]
    long_events = []

    def long_stream():  # in flight when the signal comes, and for a while after
        body = {"inputs": ["一つ目。", "二つ目。", "三つ目。"], "stream": True, **LONG}
        with httpx.stream("POST", server.url + "/v1/generate", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    long_events.append(json.loads(line[6:]))

    long = threading.Thread(target=long_stream)
    long.start()
    for c in clients:
        c.start()
    while not long_events:
        time.sleep(0.01)
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    ready = None
    for _ in range(100):
        ready = httpx.get(server.url + "/ready", timeout=10)
        if ready.status_code == 503:
            break
        time.sleep(0.02)
    assert ready.status_code == 503 and ready.json()["error"]["type"] == "unavailable"
    refused = httpx.post(server.url + "/v1/generate", json={"inputs": "x"}, timeout=10)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    long.join(120)
    for c in clients:
        c.join(60)
    stop.set()
    assert server.proc.wait(60) == 0, server.stderr()
    assert long_events[-1].get("done") is True and len(long_events[-1]["results"]) == 3
    assert all(ok for _, ok in outcomes), outcomes
    answered = [s for s, _ in outcomes if s == 200]
    assert len(answered) >= 8 and {s for s, _ in outcomes} <= {200, 503, "refused"}
    assert "draining" in server.stderr() and "stopped" in server.stderr()


def test_past_the_drain_timeout_running_requests_get_an_error_response(checkpoint, tmp_path):
    server = Server(checkpoint, tmp_path, "--slots", "3", "--max-n", "1", "--drain-timeout", "2")
    results = {}
    body = {"inputs": [f"{n}つ目。" for n in range(30)], **LONG}  # 30 x 200 steps on one slot: minutes

    def plain():
        results["plain"] = httpx.post(server.url + "/v1/generate", json=body, timeout=60)

    def streamed():
        with httpx.stream("POST", server.url + "/v1/generate", json={**body, "stream": True}, timeout=60) as r:
            results["stream"] = events(r)

    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    server.wait_metric("gpt2mh_busy_slots", lambda v: v >= 1)
    time.sleep(0.2)
    start = time.monotonic()
    assert server.stop() == 0, server.stderr()
    assert time.monotonic() - start < 10
    for t in threads:
        t.join(30)
    assert results["plain"].status_code == 503 and "drain-timeout" in results["plain"].json()["error"]["message"]
    assert "drain-timeout" in results["stream"][-1]["error"]["message"]


def test_api_key_guards_every_endpoint_but_health(checkpoint, tmp_path):
    server = Server(checkpoint, tmp_path, env={"GPT2MH_API_KEY": "s3cret"})
    try:
        url, good, bad = server.url, {"Authorization": "Bearer s3cret"}, {"Authorization": "Bearer s3cres"}
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        for path in ("/ready", "/metrics", "/v1/models", "/"):
            for headers in (None, bad, {"Authorization": "s3cret"}):
                r = httpx.get(url + path, headers=headers, timeout=10)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
            assert httpx.get(url + path, headers=good, timeout=10).status_code == 200
        body = {"inputs": "x", "max_new_tokens": 2}
        assert httpx.post(url + "/v1/generate", json=body, timeout=10).status_code == 401
        assert httpx.post(url + "/v1/generate", json=body, headers=good, timeout=10).status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="pos", prompt="x", max_tokens=2, temperature=0).choices
        try:
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError:
            pass
        assert "warning" not in server.stderr()
    finally:
        assert server.stop() == 0


def test_a_non_loopback_bind_without_a_key_warns(checkpoint, tmp_path):
    server = Server(checkpoint, tmp_path, "--host", "0.0.0.0")
    assert server.stop() == 0
    assert "warning: listening on 0.0.0.0 without an API key" in server.stderr()


def test_bad_flags_are_one_line_errors(checkpoint, tmp_path):
    from helpers import offline_env, one_line_error, run_cli

    env = offline_env(tmp_path / "caches")
    one_line_error(run_cli(["serve", "--model", checkpoint, "--max-queue", "0"], cwd=tmp_path, env=env), "serve",
                   "--max-queue 0: must be >= 1")
    one_line_error(run_cli(["serve", "--model", tmp_path / "nope"], cwd=tmp_path, env=env), "serve", "nope")
    one_line_error(run_cli(["serve", "--model", checkpoint, "--head-slots", "pos=4"], cwd=tmp_path, env=env), "serve",
                   "give each of the heads")
    proc = run_cli(["serve", "--model", checkpoint, "--slots", "0"], cwd=tmp_path, env=env)  # argparse's usage error
    assert proc.returncode == 2 and "argument --slots: 0: need at least 1 stream slot" in proc.stderr
