"""Every refusal of `gpt2mh serve` has its status and names what is wrong, in one shape:
{"error": {"message", "type", "param"}}. Load: a full queue is 429 with Retry-After; a timeout is 504;
a client that disconnects (plain or streaming) frees its slots (seen in /metrics); an input that
breaks the engine fails alone while the others are served."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import Server, events

from gpt2mh import generate_text

LONG = {"heads": ["pos"], "min_new_tokens": 240, "max_new_tokens": 240}  # EOS banned: 240 steps per input


@pytest.fixture(scope="module")
def limited(checkpoint, tmp_path_factory):
    """One slot per head (3 slots, one sequence per input), 2 inputs may wait, 1 s per request, 4 KiB bodies."""
    s = Server(checkpoint, tmp_path_factory.mktemp("limited"), "--head-slots", "reading=1,entities=1,pos=1",
               "--max-n", "1", "--max-queue", "2",
               "--request-timeout", "1", "--max-body-bytes", "4096", "--max-new-tokens-limit", "240")
    yield s
    assert s.stop() == 0, s.stderr()


def error(r: httpx.Response, status: int, param=None, match: str = "") -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param"}, body
    assert body["error"]["param"] == param, body
    assert match in body["error"]["message"], body
    return body["error"]["message"]


def post(server, body, path="/v1/generate", **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def idle(server) -> None:
    assert server.wait_metric("gpt2mh_busy_slots", lambda v: v == 0) == 0
    assert server.wait_metric("gpt2mh_queue_depth", lambda v: v == 0) == 0


# ---- 400, 404, 413, 422 -------------------------------------------------------------------------------
def test_malformed_json_is_400(server):
    r = httpx.post(server.url + "/v1/generate", content=b'{"inputs": ', timeout=10)
    error(r, 400, match="malformed JSON")
    error(httpx.post(server.url + "/v1/generate", content=b"[1, 2]", timeout=10), 400, match="JSON object")


def test_unknown_head_is_400_listing_the_heads(server):
    msg = error(post(server, {"inputs": "x", "heads": ["tense"]}), 400, "heads", "unknown head(s) ['tense']")
    assert "['reading', 'entities', 'pos']" in msg
    error(post(server, {"inputs": "x", "per_head": {"nope": {}}}), 400, "per_head", "reading")
    error(post(server, {"inputs": "x", "heads": ["pos"]}, "/v1/score") if False else
          post(server, {"inputs": "x", "continuations": "y", "heads": ["nope"]}, "/v1/score"), 400, "heads")


def test_input_longer_than_the_context_is_400(server):
    long_text = "".join(f"{n}年に東京で会議が開かれた。" for n in range(200))
    error(post(server, {"inputs": ["短い。", long_text]}), 400, "inputs", "inputs[1]")
    error(post(server, {"inputs": "短い。", "max_new_tokens": 255}), 400, "max_new_tokens", "n_positions=256")
    error(post(server, {"inputs": long_text, "continuations": "x"}, "/v1/score"), 400, "inputs", "n_positions")


def test_max_new_tokens_above_the_limit_is_400(server):
    error(post(server, {"inputs": "x", "max_new_tokens": 513}), 400, "max_new_tokens", "limit 512")
    error(post(server, {"inputs": "x", "per_head": {"pos": {"max_new_tokens": 600}}}), 400,
          "per_head.pos.max_new_tokens", "limit 512")
    error(post(server, {"inputs": "x", "num_return_sequences": 5}), 400, "num_return_sequences", "limit 4")
    error(post(server, {"inputs": "x", "per_head": {"pos": {"num_beams": 2}}}), 400, "per_head.pos.num_beams",
          "limit 1 (--max-beams)")
    error(post(server, {"inputs": "x", "per_head": {"pos": {"choices": list("abcde")}}}), 400, "per_head.pos.choices",
          "limit 4")


@pytest.mark.parametrize("body, param, match", [
    ({"temperature": 0, "do_sample": True}, "temperature", "temperature=0 is out of range"),
    ({"top_p": 1.5}, "top_p", "top_p=1.5 is out of range"),
    ({"per_head": {"pos": {"top_k": -1}}}, "per_head.pos.top_k", "top_k=-1 is out of range"),
    ({"max_new_tokens": "ten"}, "max_new_tokens", "must be an integer"),
    ({"do_sample": "yes"}, "do_sample", "do_sample='yes'"),
    ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens", "min_new_tokens=9"),
    ({"seed": -1}, "seed", "seed=-1"),
    ({"stream": "yes"}, "stream", "stream='yes'"),
    ({"temprature": 1.0}, "temprature", "unknown field"),
    ({"per_head": {"pos": {"early_stopping": "soon"}}}, "per_head.pos.early_stopping", "early_stopping='soon'"),
    ({"per_head": {"pos": {"choices": ["a", "a"]}}}, "per_head.pos.choices", "must not repeat"),
])
def test_bad_control_values_are_422_with_the_librarys_message(server, body, param, match):
    error(post(server, {"inputs": "x", **body}), 422, param, match)


def test_not_found_and_wrong_method_keep_the_error_shape(server):
    error(httpx.get(server.url + "/v1/nothing", timeout=10), 404)
    error(httpx.get(server.url + "/v1/generate", timeout=10), 405)


def test_body_over_the_limit_is_413_declared_or_streamed(limited):
    big = {"inputs": "あ" * 3000}
    error(post(limited, big), 413, match="--max-body-bytes 4096")

    def chunks():  # no Content-Length: the body is counted as it arrives
        yield b'{"inputs": "'
        for _ in range(100):
            yield b"a" * 100
        yield b'"}'

    r = httpx.post(limited.url + "/v1/generate", content=chunks(), timeout=10)
    error(r, 413, match="--max-body-bytes 4096")
    assert post(limited, {"inputs": "x", "max_new_tokens": 2}).status_code == 200


# ---- load: 429, 504, disconnects ----------------------------------------------------------------------------
def test_full_queue_is_429_with_retry_after_and_a_dropped_stream_frees_its_slots(limited):
    idle(limited)
    body = {"inputs": ["一つ目。", "二つ目。", "三つ目。", "四つ目。", "五つ目。"], "stream": True, **LONG}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", limited.url + "/v1/generate", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: dropping the iterator closes the connection
            assert next(lines).startswith("data: ")  # admitted and streaming: 4 inputs wait for the pos slot
            assert limited.metric("gpt2mh_queue_depth") >= 2 and limited.metric("gpt2mh_busy_slots") == 1
            full = post(limited, {"inputs": "x", "max_new_tokens": 2})
            error(full, 429, match="queue is full")
            assert full.headers["retry-after"] == "1"
        # the stream is closed mid-way: its input and the waiting ones are dropped
    idle(limited)
    assert post(limited, {"inputs": "x", "max_new_tokens": 2}).status_code == 200


def test_a_plain_request_whose_client_disconnects_frees_its_slots(limited):
    idle(limited)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(limited.url + "/v1/generate", json={"inputs": ["一つ目。", "二つ目。"], **LONG}, timeout=0.3)
    idle(limited)


def test_request_timeout_is_504_and_frees_the_slots(limited):
    idle(limited)
    start = time.monotonic()
    r = post(limited, {"inputs": [f"{n}つ目。" for n in range(20)], **LONG})  # 20 x 240 steps on one slot
    error(r, 504, match="--request-timeout 1")
    assert time.monotonic() - start < 10
    idle(limited)
    with httpx.stream("POST", limited.url + "/v1/generate", json={"inputs": ["a", "b", "c"], "stream": True, **LONG},
                      timeout=60) as s:
        got = events(s)
    assert got[-1]["error"]["type"] == "timeout_error"  # a stream has sent its 200: the error is its last event
    idle(limited)


# ---- faults --------------------------------------------------------------------------------------------
def test_an_input_that_breaks_the_engine_fails_alone(server, reference):
    model, tok = reference
    texts = ["今日は東京で会議がありました。", "明日は大阪で雨が降るでしょう。"]
    want = generate_text(model, tok, texts, max_new_tokens=120, min_new_tokens=120, compile=False)
    # every token banned but EOS, and EOS banned by min_new_tokens: the engine finds nothing to pick
    poison = {"inputs": "x", "heads": ["pos"], "min_new_tokens": 5,
              "bad_words_ids": [[i] for i in range(model.config.vocab_size)]}

    def good(text):
        return post(server, {"inputs": [text], "max_new_tokens": 120, "min_new_tokens": 120})

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(good, t) for t in texts]
        time.sleep(0.05)
        bad = pool.submit(post, server, poison).result()
        outs = [f.result() for f in running]
    error(bad, 422, match="every token is banned")
    for text, r in zip(texts, outs):
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["outputs"] == {h: want[h][texts.index(text)] for h in want}
    assert "the engine failed" in server.stderr() and "failed: ValueError" in server.stderr()
    again = post(server, {"inputs": texts, "max_new_tokens": 120, "min_new_tokens": 120})
    assert again.json()["results"][1]["outputs"] == {h: want[h][1] for h in want}  # still serving
