"""Label choices: per_head={"h": {"choices": [...]}} makes head h answer the choice it scores highest —
the log-probability of the choice's ids then </s> (the training format, as `score_text` scores it; no
length normalisation: the probability that the head writes exactly this answer) — computed in the
same engine pass as the other heads' generation."""
from __future__ import annotations

import pytest
import torch

from gpt2mh import MultiHeadGPT2, generate_rows, generate_text, score_text, stream
from gpt2mh.inputs import encode_prompts
from gpt2mh.tokenizer import Tokenizer

CFG = dict(vocab_size=32000, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
           pad_token_id=3, initializer_range=0.3)
PROMPTS = ["今日は晴れです。", "東京の天気を教えて", "吾輩は猫である。名前はまだ無い。", "", "走った"]
WORDS = ["過去", "現在", "未来", "東京", "大阪", "猫", "犬", "晴れ", "雨", "名詞", "動詞", "人名", "地名", "はい", "いいえ",
         "肯定", "否定", "中立", "スポーツ", "政治", "経済", "文化", "か", "の"]

@pytest.fixture(scope="module")
def setup(hf_checkpoint):
    _, folder = hf_checkpoint(CFG)
    model = MultiHeadGPT2.from_pretrained(folder, heads=["a", "b", "c"])
    with torch.no_grad():  # three different heads
        model.heads.add_(torch.randn(model.heads.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    return model, Tokenizer("tests/fixtures/rinna/spiece.model")


def scored(model, tok, head, choices):
    """Per prompt, each choice's log-likelihood by score_text (the reference)."""
    return [[score_text(model, tok, p, c, heads=[head])[head][0] for c in choices] for p in PROMPTS]


@pytest.fixture(scope="module")
def CHOICES(setup):
    """Choices whose best differs from prompt to prompt under head a (a random model prefers some
    words everywhere; with such choices a wrong pick could pass unseen)."""
    model, tok = setup
    s = torch.tensor([score_text(model, tok, [p] * len(WORDS), WORDS, heads=["a"])["a"] for p in PROMPTS])  # (P, W)
    for i in range(len(WORDS)):
        for j in range(i + 1, len(WORDS)):
            d = s[:, i] - s[:, j]
            if (d > 0.05).any() and (d < -0.05).any():
                rest = [w for k, w in enumerate(WORDS) if k not in (i, j)]
                choices = [WORDS[i], WORDS[j], rest[0] + rest[1]]  # and a longer one, of two words
                best = s[:, [i, j]].amax(1)
                return choices if (torch.tensor(score_text(model, tok, PROMPTS, [choices[2]] * len(PROMPTS),
                                                           heads=["a"])["a"]) < best).all() else choices[:2]
    pytest.fail("no pair of words whose order changes across the prompts")


def test_answer_is_the_best_scored_choice(setup, CHOICES):
    model, tok = setup
    rows = {i: (out, used) for i, out, used in generate_rows(
        model, tok, PROMPTS, compile=False, max_new_tokens=6, usage=True,
        per_head={"a": {"choices": CHOICES}, "c": {"choices": CHOICES[:2]}})}
    for head, choices in (("a", CHOICES), ("c", CHOICES[:2])):
        ref = scored(model, tok, head, choices)
        for i in range(len(PROMPTS)):
            want = max(range(len(choices)), key=lambda k: ref[i][k])
            assert rows[i][0][head] == choices[want], (head, i, ref[i])
            assert rows[i][1]["logprobs"][head] == pytest.approx(ref[i][want], abs=1e-4)
    assert len({rows[i][0]["a"] for i in rows}) > 1, "every prompt gets the same answer: a wrong pick could pass"


def test_other_heads_generate_as_without_choices(setup, CHOICES):
    model, tok = setup
    plain = generate_text(model, tok, PROMPTS, compile=False, max_new_tokens=6, heads=["b"])
    mixed = generate_text(model, tok, PROMPTS, compile=False, max_new_tokens=6,
                          per_head={"a": {"choices": CHOICES}, "c": {"choices": CHOICES}})
    assert mixed["b"] == plain["b"]
    assert set(mixed["a"]) <= set(CHOICES) and set(mixed["c"]) <= set(CHOICES)


def test_choices_in_few_slots_and_in_a_stream(setup, CHOICES):
    model, tok = setup
    kw = dict(compile=False, max_new_tokens=6, per_head={"a": {"choices": CHOICES}})
    once = generate_text(model, tok, PROMPTS, **kw)
    rows = dict(generate_rows(model, tok, PROMPTS * 3, slots=5, **kw))  # 4 choice rows + 1 slot per input
    assert [rows[i]["a"] for i in range(len(PROMPTS) * 3)] == once["a"] * 3
    ids, mask = encode_prompts(tok, PROMPTS, model)
    got = {}
    for head, row, text in stream(model, tok, ids, mask, **kw):
        got[head, row] = got.get((head, row), "") + text
    assert [got["a", i] for i in range(len(PROMPTS))] == once["a"]
    assert [got.get(("b", i), "") for i in range(len(PROMPTS))] == once["b"]


def test_generate_returns_the_answer_ids_and_log_prob(setup, CHOICES):
    model, tok = setup
    ids, mask = encode_prompts(tok, PROMPTS[:2], model)
    out = model.generate(ids, mask, heads=["a"], compile=False, choices=CHOICES, tokenizer=tok,
                         return_dict_in_generate=True)["a"]
    ref = scored(model, tok, "a", CHOICES)[:2]
    for b in range(2):
        best = max(range(len(CHOICES)), key=lambda k: ref[b][k])
        answer = tok.encode(CHOICES[best], add_eos=True)
        assert out.sequences[b, :len(answer)].tolist() == answer
        assert float(out.sequences_scores[b]) == pytest.approx(ref[b][best], abs=1e-4)


@pytest.mark.parametrize("bad, match", [
    (dict(choices=["過去", ""]), "choices"),
    (dict(choices=["過去", "過去"]), "choices"),
    (dict(choices=["過去", "現在"], num_beams=2), "choices"),
    (dict(choices=["過去", "現在"], num_return_sequences=2), "choices"),
])
def test_bad_choices_name_the_setting(setup, bad, match):
    model, tok = setup
    with pytest.raises(ValueError, match=match):
        generate_text(model, tok, PROMPTS[:1], compile=False, max_new_tokens=3, per_head={"a": bad})


def test_choices_need_the_tokenizer(setup):
    model, tok = setup
    ids, mask = encode_prompts(tok, PROMPTS[:1], model)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, mask, choices=["過去"], max_new_tokens=3)


@pytest.mark.compile
def test_choices_beams_and_stop_strings_compiled_equal_eager(setup, CHOICES):
    model, tok = setup
    per_head = {"a": {"choices": CHOICES}, "b": {"num_beams": 3, "num_return_sequences": 2},
                "c": {"stop_strings": ["の", "は"], "do_sample": True}}
    kw = dict(max_new_tokens=8, per_head=per_head, seed=1)
    assert generate_text(model, tok, PROMPTS, compile=True, **kw) == generate_text(model, tok, PROMPTS, compile=False,
                                                                                   **kw)
