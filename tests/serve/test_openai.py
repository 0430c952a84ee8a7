"""/v1/completions and /v1/models through the official `openai` client, unchanged: greedy equals
`generate_text` for that head, n and seed, streaming, stop strings (cut before the first one), errors."""
from __future__ import annotations

import openai
import pytest
from helpers import HEADS

from gpt2mh import generate_text

PROMPTS = ["今日は東京で会議がありました。", "明日は大阪で雨が降るでしょう。"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_are_the_heads(client):
    assert [m.id for m in client.models.list()] == list(HEADS)


def test_greedy_completion_equals_generate_text(client, reference):
    model, tok = reference
    out = client.completions.create(model="entities", prompt=PROMPTS, max_tokens=10, temperature=0)
    want = generate_text(model, tok, PROMPTS, heads=["entities"], max_new_tokens=10, compile=False)["entities"]
    assert [c.text for c in out.choices] == want
    assert [c.index for c in out.choices] == [0, 1]
    assert out.model == "entities" and out.object == "text_completion"
    assert out.usage.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS)
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)


def test_n_and_seed(client, reference):
    model, tok = reference
    kw = dict(model="pos", prompt=PROMPTS[0], max_tokens=8, temperature=1.2, top_p=0.9, n=3, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    want = generate_text(model, tok, PROMPTS[0], heads=["pos"], do_sample=True, temperature=1.2, top_p=0.9,
                         max_new_tokens=8, num_return_sequences=3, seed=11, compile=False)["pos"][0]
    assert [c.text for c in a.choices] == want and len(set(want)) > 1


def test_stream_concatenates_to_the_plain_text(client):
    kw = dict(model="reading", prompt=PROMPTS, max_tokens=16, temperature=0)
    plain = client.completions.create(**kw)
    pieces, finish = {}, {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            pieces[c.index] = pieces.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [pieces[k] for k in range(2)] == [c.text for c in plain.choices]
    assert [finish[k] for k in range(2)] == [c.finish_reason for c in plain.choices]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_cuts_before_the_first_stop_string(client, reference, stream):
    model, tok = reference
    full = generate_text(model, tok, PROMPTS[1], heads=["pos"], max_new_tokens=30, compile=False)["pos"][0]
    assert len(full) > 8
    stop = full[4:6]
    kw = dict(model="pos", prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[stop, "never-there"])
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        text = "".join(c.text for chunk in chunks for c in chunk.choices)
        reason = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    else:
        out = client.completions.create(**kw)
        text, reason = out.choices[0].text, [out.choices[0].finish_reason]
    assert text == full[:full.index(stop)] and reason == ["stop"]


def test_errors_reach_the_client_as_openai_errors(client):
    with pytest.raises(openai.BadRequestError, match="heads") as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError, match="top_p") as e:
        client.completions.create(model="pos", prompt="x", max_tokens=2, top_p=1.5)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError, match="max_tokens") as e:
        client.completions.create(model="pos", prompt="x", max_tokens=100000)
    assert e.value.body["param"] == "max_tokens"
