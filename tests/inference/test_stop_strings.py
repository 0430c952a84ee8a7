"""stop_strings against transformers' `generate(stop_strings=..., tokenizer=...)` on the real rinna
tokenizer: the same token ids (the tokens that complete a stop string kept, as HF keeps them), however
the tokenizer splits the string — one token's text, across two tokens, ending inside a token (HF
stops there too: the string overlaps the newest token) — and the texts of generate_text / stream cut before the stop string."""
from __future__ import annotations

import warnings

import pytest
import torch

from gpt2mh import MultiHeadGPT2, generate_text, stream
from gpt2mh.inputs import encode_prompts
from gpt2mh.tokenizer import Tokenizer

SPIECE = "tests/fixtures/rinna/spiece.model"
CFG = dict(vocab_size=32000, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
           pad_token_id=3, initializer_range=0.3)
PROMPTS = ["今日は晴れです。", "東京の天気を教えて", "吾輩は猫である。名前はまだ"]
K = 24


@pytest.fixture(scope="module")
def setup(hf_checkpoint):
    import transformers
    hf, folder = hf_checkpoint(CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_tok = transformers.T5Tokenizer(SPIECE, extra_ids=0, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                          pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                          mask_token="[MASK]", additional_special_tokens=[])
    hf_tok.do_lower_case = True
    return hf, hf_tok, MultiHeadGPT2.from_pretrained(folder, heads=["a", "b"]), Tokenizer(SPIECE)


def encode(model, tok, text):
    return encode_prompts(tok, [text], model)[0]  # the prompt as generate_text encodes it


def hf_run(hf, hf_tok, ids, stops):
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=K,
                          pad_token_id=3, eos_token_id=2, **({"stop_strings": stops, "tokenizer": hf_tok} if stops else {}))
    return out[0, ids.shape[1]:]


def stop_cases(tok, new_ids):
    """Stop strings taken from an unconstrained continuation: a token's whole text, the end of one
    token's text with the start of the next (across a split, ending inside the next token), the last
    character of a later token."""
    pieces = [tok.decode([t]) for t in new_ids]
    cases = []
    for i in range(2, len(pieces) - 2):
        a, b = pieces[i].strip(), pieces[i + 1].strip()
        if a and b and " " not in a + b:
            cases.append([a[-1] + b[0]])  # across two tokens
            cases.append([a])  # one token's text
            break
    late = next((p.strip() for p in pieces[len(pieces) // 2:] if p.strip() and " " not in p.strip()), None)
    if late:
        cases.append([late[-1], "存在しない文字列"])  # one of two; the other never occurs
    return cases


def test_stop_strings_match_transformers(setup):
    hf, hf_tok, ours, tok = setup
    tested = cut = 0
    for prompt in PROMPTS:
        ids = encode(ours, tok, prompt)
        free = hf_run(hf, hf_tok, ids, None)
        assert torch.equal(ours.generate(ids, heads=["a"], compile=False, max_new_tokens=K, eos_token_id=2)["a"][0],
                           free)
        for stops in stop_cases(tok, free.tolist()):
            ref = hf_run(hf, hf_tok, ids, stops)
            got = ours.generate(ids, heads=["a"], compile=False, max_new_tokens=K, eos_token_id=2, stop_strings=stops,
                                tokenizer=tok)["a"][0]
            assert got.tolist() == ref.tolist(), (prompt, stops)
            cut += len(ref) < len(free)
            text = generate_text(ours, tok, prompt, heads=["a"], compile=False, max_new_tokens=K, stop_strings=stops)
            full = tok.decode(ref.tolist())
            if len(ref) < len(free):  # stopped: the text ends before the stop string
                assert text["a"][0] == full[: min(full.find(x) for x in stops if x in full)]
            streamed = "".join(t for _, _, t in stream(ours, tok, ids, heads=["a"], compile=False, max_new_tokens=K,
                                                        stop_strings=stops))
            assert streamed == text["a"][0]
            tested += 1
    assert tested >= 6 and cut >= 5  # most cases end early: they test something


def test_stop_strings_per_head_and_in_the_engine(setup):
    # head a stops, head b runs on; the same through generate_rows' engine with few slots
    from gpt2mh import generate_rows
    _, _, ours, tok = setup
    free = generate_text(ours, tok, PROMPTS, compile=False, max_new_tokens=K)
    stop = free["a"][0][3:5]
    out = generate_text(ours, tok, PROMPTS, compile=False, max_new_tokens=K, per_head={"a": {"stop_strings": [stop]}})
    assert out["b"] == free["b"] and out["a"][0] == free["a"][0][: free["a"][0].index(stop)]
    rows = dict(generate_rows(ours, tok, PROMPTS * 4, compile=False, max_new_tokens=K, slots=3,
                              per_head={"a": {"stop_strings": [stop]}}))
    assert [rows[i]["a"] for i in range(3)] == out["a"]


def test_stop_strings_need_the_tokenizer(setup):
    _, _, ours, tok = setup
    with pytest.raises(ValueError, match="tokenizer"):
        ours.generate(encode(ours, tok, PROMPTS[0]), max_new_tokens=4, stop_strings=["。"])
    with pytest.raises(ValueError, match="stop_strings"):
        ours.generate(encode(ours, tok, PROMPTS[0]), max_new_tokens=4, stop_strings=[""], tokenizer=tok)
    with pytest.raises(ValueError, match="stop_strings"):
        ours.generate(encode(ours, tok, PROMPTS[0]), max_new_tokens=4, stop_strings=["。"], num_beams=2, tokenizer=tok)
