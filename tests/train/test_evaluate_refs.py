"""Evaluation references the tokenizer can never produce (issue 28, class 7): upper case, full-width and
half-width forms, combining marks, odd spaces. A model that generates a reference's own tokens must score
exact match 1 and char accuracy 1 (references are scored in the tokenizer's form), and each data file that
holds such references is reported once, with a count. Searched with hypothesis over such references."""
from __future__ import annotations

import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2mh.tokenizer import Tokenizer
from gpt2mh.train import evaluate as ev
from gpt2mh.train.data import Example

TOK = Tokenizer.from_pretrained()
ALPHABET = "ABCXYZabcＡＢＣａｂｃ０１２012ｶﾞｷﾞｯﾀｰか\u3099は\u309aカタカナ漢字東京 　\t。、！？!?/名助動記"
REFS = st.text(st.sampled_from(ALPHABET), min_size=1, max_size=16)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ref=REFS)
def test_the_references_own_tokens_score_full_marks(ref):
    output = TOK.decode(TOK.encode(ref, add_eos=False))  # what generate_text returns for those tokens
    got = ev.score_predictions({"h": [output]}, [Example("x", {"h": ref}, "data.jsonl:1")], TOK)
    assert got == {"h/exact_match": 1.0, "h/char_accuracy": 1.0}, (ref, output)


def test_unreachable_references_are_reported_once_per_file_with_a_count(caplog, monkeypatch):
    monkeypatch.setattr(ev, "_WARNED", set())
    examples = [Example("x", {"h": "ＮＨＫ", "g": "ok"}, "a.jsonl:1"), Example("y", {"h": "ﾃｽﾄ"}, "a.jsonl:2"),
                Example("z", {"h": "plain"}, "b.jsonl:1")]
    with caplog.at_level(logging.WARNING, logger="gpt2mh"):
        assert ev.warn_unreachable(TOK, examples, ["h", "g"]) == 2
        assert ev.warn_unreachable(TOK, examples, ["h", "g"]) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("a.jsonl: 2 reference(s)"), lines
