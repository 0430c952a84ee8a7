"""Beam search, label choices and log-probabilities over HTTP (a server started with --max-beams 3)
against the library in this process: texts equal `generate_text`, the choice log-prob `score_text`, and a
streamed request ends with the same texts (beams and choices come whole, at the end)."""
from __future__ import annotations

import httpx
import pytest
from helpers import Server, events

from gpt2mh import generate_text, score_text

TEXTS = ["今日は東京で会議がありました。", "明日は大阪で雨が降るでしょう。"]
PER_HEAD = {"reading": {"choices": ["過去", "現在", "未来"]}, "entities": {"num_beams": 3, "length_penalty": 0.5},
            "pos": {"num_beams": 2, "num_return_sequences": 2}}


@pytest.fixture(scope="module")
def beams_server(checkpoint, tmp_path_factory):
    s = Server(checkpoint, tmp_path_factory.mktemp("serve-beams"), "--max-beams", "3", "--slots", "18")
    yield s
    assert s.stop() == 0, s.stderr()


def test_beams_and_choices_equal_the_library(beams_server, reference):
    model, tok = reference
    r = httpx.post(beams_server.url + "/v1/generate", json={"inputs": TEXTS, "max_new_tokens": 10,
                                                            "per_head": PER_HEAD}, timeout=120)
    assert r.status_code == 200, r.text
    want = generate_text(model, tok, TEXTS, max_new_tokens=10, per_head=PER_HEAD, compile=False)
    rows = r.json()["results"]
    assert {h: [row["outputs"][h] for row in rows] for h in want} == want
    for i, row in enumerate(rows):
        lp = score_text(model, tok, TEXTS[i], row["outputs"]["reading"], heads=["reading"])["reading"][0]
        assert row["logprobs"]["reading"] == pytest.approx(lp, abs=1e-4)
    with httpx.stream("POST", beams_server.url + "/v1/generate", timeout=120,
                      json={"inputs": TEXTS, "max_new_tokens": 10, "per_head": PER_HEAD, "stream": True}) as s:
        *deltas, final = events(s)
    assert {h: [row["outputs"][h] for row in final["results"]] for h in want} == want
    got = {}
    for d in deltas:
        got[d["index"], d["head"], d["sequence"]] = got.get((d["index"], d["head"], d["sequence"]), "") + d["text"]
    assert [got[i, "reading", 0] for i in range(2)] == want["reading"]
    assert [[got[i, "pos", r] for r in range(2)] for i in range(2)] == want["pos"]


def test_output_scores_over_http(beams_server, reference):
    model, tok = reference
    body = {"inputs": TEXTS[0], "max_new_tokens": 6, "output_scores": True,
            "per_head": {"entities": {"num_beams": 3}}}
    row = httpx.post(beams_server.url + "/v1/generate", json=body, timeout=120).json()["results"][0]
    assert set(row["token_logprobs"]) == {"reading", "entities", "pos"}
    assert all(lp <= 0 for seqs in row["token_logprobs"].values() for seq in seqs for lp in seq)
    ids = tok.encode(TEXTS[0])
    import torch
    out = model.generate(torch.tensor([ids]), heads=["entities"], max_new_tokens=6, num_beams=3, output_scores=True,
                         return_dict_in_generate=True, compile=False)["entities"]
    assert row["sequence_scores"]["entities"] == pytest.approx(out.sequences_scores.tolist(), abs=1e-5)
