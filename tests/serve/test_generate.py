"""POST /v1/generate and /v1/score of a real `gpt2mh serve` process against the library in this process:

- greedy text equals `generate_text` on the same inputs (per-head controls too), alone or under load;
- a seeded sampled request equals `generate_text(seed=...)` and is reproducible;
- the streamed deltas of each head concatenate to the non-streamed text, then one final event;
- /v1/score equals `score_text`.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import events

from gpt2mh import generate_text, score_text

TEXTS = ["今日は東京で会議がありました。", "明日は大阪で雨が降るでしょう。", "山田さんは大阪に行った。"]
PER_HEAD = {"reading": {"max_new_tokens": 4}, "pos": {"repetition_penalty": 1.3}}


def post(server, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.url + "/v1/generate", json=body, timeout=60, **kw)


def texts_by_head(body: dict) -> dict:
    """{head: [text per input]}, the layout generate_text returns."""
    rows = body["results"]
    return {h: [row["outputs"][h] for row in rows] for h in rows[0]["outputs"]}


def test_greedy_equals_generate_text(server, reference):
    model, tok = reference
    r = post(server, {"inputs": TEXTS, "max_new_tokens": 12, "per_head": PER_HEAD})
    assert r.status_code == 200, r.text
    assert texts_by_head(r.json()) == generate_text(model, tok, TEXTS, max_new_tokens=12, per_head=PER_HEAD,
                                                    compile=False)
    row = r.json()["results"][0]
    assert row["usage"]["prompt_tokens"] == len(tok.encode(TEXTS[0]))
    assert row["usage"]["new_tokens"]["reading"] <= 4 and row["usage"]["new_tokens"]["entities"] <= 12


def test_one_string_and_a_subset_of_heads(server, reference):
    model, tok = reference
    r = post(server, {"inputs": TEXTS[1], "heads": ["pos"], "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["outputs"] == {"pos": generate_text(model, tok, TEXTS[1], heads=["pos"],
                                                                       max_new_tokens=6, compile=False)["pos"][0]}


def test_seeded_sampling_equals_the_library_and_repeats(server, reference):
    model, tok = reference
    body = {"inputs": TEXTS, "do_sample": True, "temperature": 1.5, "top_k": 50, "max_new_tokens": 10, "seed": 7,
            "num_return_sequences": 2}
    a, b = post(server, body).json(), post(server, body).json()
    assert a["results"] == b["results"]
    assert texts_by_head(a) == generate_text(model, tok, TEXTS, do_sample=True, temperature=1.5, top_k=50,
                                             max_new_tokens=10, seed=7, num_return_sequences=2, compile=False)
    assert post(server, {**body, "seed": 8}).json()["results"] != a["results"]


def test_greedy_outputs_do_not_depend_on_other_requests(server, reference):
    model, tok = reference
    want = generate_text(model, tok, TEXTS, max_new_tokens=20, compile=False)
    bodies = [{"inputs": [t], "max_new_tokens": 20, "stream": k % 2 == 1} for k in range(12) for t in TEXTS]

    def run(body):
        if body["stream"]:
            with httpx.stream("POST", server.url + "/v1/generate", json=body, timeout=60) as r:
                return texts_by_head(events(r)[-1])
        return texts_by_head(post(server, body).json())

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(run, bodies))
    for body, out in zip(bodies, got):
        i = TEXTS.index(body["inputs"][0])
        assert out == {h: [want[h][i]] for h in want}


@pytest.mark.parametrize("controls", [{}, {"do_sample": True, "top_p": 0.9, "seed": 3}])
def test_stream_concatenates_to_the_plain_text(server, controls):
    body = {"inputs": TEXTS, "max_new_tokens": 24, **controls}
    plain = post(server, body).json()
    with httpx.stream("POST", server.url + "/v1/generate", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r)
    *deltas, final = got
    assert final["done"] is True and final["results"] == plain["results"]
    joined = {}
    for e in deltas:
        assert set(e) == {"index", "head", "sequence", "text"} and e["text"]
        joined[e["index"], e["head"]] = joined.get((e["index"], e["head"]), "") + e["text"]
    assert {k: v for k, v in joined.items()} == {(row["index"], h): text for row in plain["results"]
                                                 for h, text in row["outputs"].items() if text}
    assert len(deltas) > len(joined)  # really streamed: several pieces per output


def test_score_equals_score_text(server, reference):
    model, tok = reference
    body = {"inputs": TEXTS[:2], "continuations": ["過去", "現在"], "heads": ["reading", "pos"]}
    r = httpx.post(server.url + "/v1/score", json=body, timeout=60)
    assert r.status_code == 200, r.text
    want = score_text(model, tok, TEXTS[:2], ["過去", "現在"], heads=["reading", "pos"])
    assert r.json()["scores"].keys() == want.keys()
    for h in want:
        assert r.json()["scores"][h] == pytest.approx(want[h], rel=1e-5)


def test_many_distinct_controls_keep_serving(server, reference):
    # the worker renews an idle engine that has seen many configs: outputs stay the library's
    model, tok = reference
    for k in range(1, 72):  # 71 configs (top_k differs), one token each: no decode step
        r = post(server, {"inputs": "x", "heads": ["reading"], "max_new_tokens": 1, "top_k": k})
        assert r.json()["results"][0]["usage"]["new_tokens"] == {"reading": 1}
    r = post(server, {"inputs": TEXTS, "max_new_tokens": 12})
    assert texts_by_head(r.json()) == generate_text(model, tok, TEXTS, max_new_tokens=12, compile=False)


def test_stop_strings_equal_the_library(server, reference):
    model, tok = reference
    full = generate_text(model, tok, TEXTS[0], heads=["pos"], max_new_tokens=30, compile=False)["pos"][0]
    stop = full[5:7]
    body = {"inputs": TEXTS[0], "heads": ["pos"], "max_new_tokens": 30, "stop_strings": [stop]}
    plain = post(server, body).json()["results"][0]
    want = generate_text(model, tok, TEXTS[0], heads=["pos"], max_new_tokens=30, stop_strings=[stop],
                         compile=False)["pos"][0]
    assert plain["outputs"]["pos"] == want == full[:full.index(stop)]
    assert plain["usage"]["new_tokens"]["pos"] < 30  # the engine stopped there
    with httpx.stream("POST", server.url + "/v1/generate", json={**body, "stream": True}, timeout=60) as r:
        *deltas, final = events(r)
    assert "".join(e["text"] for e in deltas) == want and final["results"][0] == plain
