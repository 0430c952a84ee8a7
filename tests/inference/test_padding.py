"""Padding on either side is a normal input (issue 11): generate, stream and score left-align rows from
attention_mask (gpt2mh/inputs.py), so a right-padded, left-padded or mixed batch gives, row by row,
what transformers gives for the same prompts unpadded. Greedy ids are compared exactly (a fresh
head is an exact copy of HF's LM head); scores within HF_ATOL (sums of ~6 fp32 log-probs of size ~7
from other, equivalent kernels: ~1e-6 each, see test_score.py). The pad slots hold random ids, so a
pad that leaked into the computation would change the result."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2mh import MultiHeadGPT2
from gpt2mh.inference.generate import stream
from gpt2mh.inputs import prompt_batch

V, PAD, EOS = 1000, 3, 2
CFG = dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=EOS,
           pad_token_id=PAD)
HF_ATOL = 1e-4
NEW = 6
LENGTHS = [5, 2, 7, 3]


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    hf, folder = hf_checkpoint(CFG)
    return hf, MultiHeadGPT2.from_pretrained(folder, heads=["lm", "other"])


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, V, (n,), generator=g) for n in LENGTHS]


def padded(rows, side, width=None, seed=1):
    """(ids, mask) with padding on `side` ("left", "right", or "mixed": alternating); pad slots hold
    random ids, not PAD, so only the mask says they are padding."""
    g = torch.Generator().manual_seed(seed)
    T = width or max(len(r) for r in rows)
    ids = torch.randint(4, V, (len(rows), T), generator=g)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        right = side == "right" or (side == "mixed" and b % 2 == 0)
        sl = slice(0, len(r)) if right else slice(T - len(r), T)
        ids[b, sl], mask[b, sl] = r, 1
    return ids, mask


def hf_greedy(hf, row):
    with torch.no_grad():
        out = hf.generate(row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), do_sample=False,
                          max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=PAD, eos_token_id=EOS)
    return out[0, len(row):]


@pytest.mark.parametrize("side", ["right", "left", "mixed"])
def test_generate_with_padding_on_any_side_equals_transformers_unpadded(pair, side):
    hf, model = pair
    rows = prompts()
    ids, mask = padded(rows, side, width=9)  # wider than the longest prompt: all-pad columns too
    out = model.generate(ids, mask, heads=["lm"], max_new_tokens=NEW, min_new_tokens=NEW, compile=False)["lm"]
    for b, row in enumerate(rows):
        assert torch.equal(out[b], hf_greedy(hf, row)), (side, b)


def test_right_padded_numpy_uint16_and_lists_generate_the_same(pair):
    _, model = pair
    ids, mask = padded(prompts(), "right")
    ref = model.generate(ids, mask, max_new_tokens=4, compile=False)
    for form in (lambda t: t.numpy().astype(np.uint16), lambda t: t.tolist(), lambda t: t.int()):
        got = model.generate(form(ids), form(mask), max_new_tokens=4, compile=False)
        assert all(torch.equal(got[h], ref[h]) for h in ref)
    batch_encoding = {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}  # what a BatchEncoding holds
    got = model.generate(batch_encoding, max_new_tokens=4, compile=False)
    assert all(torch.equal(got[h], ref[h]) for h in ref)


def test_stream_with_right_padding_equals_unpadded(pair, tok_like):
    _, model = pair
    rows = prompts()
    ids, mask = padded(rows, "right")
    got = {}
    for head, row, text in stream(model, tok_like, ids, mask, heads=["lm"], max_new_tokens=NEW,
                                  min_new_tokens=NEW, compile=False):
        got[row] = got.get(row, "") + text
    for b, row in enumerate(rows):
        alone = model.generate(row[None], heads=["lm"], max_new_tokens=NEW, min_new_tokens=NEW, compile=False)["lm"][0]
        assert got[b] == tok_like.decode(alone.tolist())


@pytest.fixture
def tok_like():
    """A stand-in tokenizer of the model's vocabulary: id i decodes to '<i>'."""
    class Tok:
        vocab_size = V

        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    return Tok()


@pytest.mark.parametrize("side", ["right", "left", "mixed"])
def test_score_with_padding_on_any_side_equals_transformers_unpadded(pair, side):
    hf, model = pair
    rows = prompts()
    targets = prompts(seed=5)
    ids, mask = padded(rows, side, width=8)
    tgt, tmask = padded(targets, "left" if side == "right" else "right", seed=2)  # targets padded too
    got = model.score(ids, mask, tgt, tmask, heads=["lm"])[0]
    for b, (prompt, target) in enumerate(zip(rows, targets)):
        with torch.no_grad():
            logp = F.log_softmax(hf(torch.cat([prompt, target])[None]).logits[0].float(), -1)
        ref = logp[len(prompt) - 1:-1].gather(1, target[:, None]).sum()
        torch.testing.assert_close(got[b], ref, atol=HF_ATOL, rtol=0)


def test_a_mask_row_of_zeros_is_refused(pair):
    _, model = pair
    ids, mask = padded(prompts(), "right")
    mask[2] = 0
    with pytest.raises(ValueError, match=r"attention_mask row\(s\) \[2\] are all 0"):
        model.generate(ids, mask, max_new_tokens=2, compile=False)
    with pytest.raises(ValueError, match=r"attention_mask row\(s\) \[2\] are all 0"):
        model.score(ids, mask, ids, mask)
    with pytest.raises(ValueError, match=r"attention_mask row\(s\) \[2\] are all 0"):
        list(stream(model, type("T", (), {"vocab_size": V, "decode": lambda s, i: ""})(), ids, mask,
                    max_new_tokens=2, compile=False))


def test_prompt_batch_left_aligns_and_keeps_order():
    ids = torch.tensor([[7, 8, 9, 0, 0], [0, 5, 0, 6, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 1, 0]])
    got_ids, got_mask = prompt_batch(ids, mask, 10)
    assert got_ids.tolist() == [[7, 8, 9], [0, 5, 6]] and got_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    got_ids, got_mask = prompt_batch(ids, mask, 10, side="right")
    assert got_ids.tolist() == [[7, 8, 9], [5, 6, 0]] and got_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert got_ids.dtype == torch.long and got_mask.dtype == torch.long


# ---- issue 28, class 2: padding is invisible to every processor, also when pad id == EOS id ----------
# Every control x padding side x what the pad slots hold x pad_token_id: a row of a padded batch gives
# exactly what it gives alone. The pad slots hold the pad id, the EOS id (GPT-2's usual pad), or the
# row's own continuation (a processor that read padding as text would then ban or penalise the very
# tokens the row makes). Sampling: the row alone is run in a batch of copies of itself, so its stream
# draws the same noise as in the padded batch (noise is per stream).
PAD_CONTROLS = {
    "greedy": {},
    "repetition_penalty": dict(repetition_penalty=3.0),
    "repetition_penalty<1": dict(repetition_penalty=0.3),
    "no_repeat_ngram_1": dict(no_repeat_ngram_size=1),
    "no_repeat_ngram_2": dict(no_repeat_ngram_size=2),
    "no_repeat_ngram_3": dict(no_repeat_ngram_size=3),
    "bad_words": "bad_words",  # built per batch: (EOS, row 1's prompt, row 1's first token) and (PAD, that token)
    "min_new_tokens": dict(min_new_tokens=NEW),
    "sample": dict(do_sample=True, temperature=0.7),
    "sample_top_k": dict(do_sample=True, top_k=5),
    "sample_top_p_min_p": dict(do_sample=True, top_p=0.8, min_p=0.05),
    "sample_typical": dict(do_sample=True, typical_p=0.7, repetition_penalty=1.3),
    "return_sequences": dict(do_sample=True, num_return_sequences=2, no_repeat_ngram_size=2),
}


@pytest.fixture(scope="module")
def eos_pad_model():
    from gpt2mh import GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=60, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=EOS)
    m = MultiHeadGPT2(cfg, ["lm", "other"]).eval()  # pad_token_id None: padding with EOS, as GPT-2 does
    with torch.no_grad():
        m.heads.normal_(0.0, 0.3)  # a small vocabulary and sharp heads: outputs repeat, so bans show
    return m


@pytest.mark.parametrize("control", list(PAD_CONTROLS))
@pytest.mark.parametrize("pad_token_id", [None, PAD])
def test_every_control_sees_a_padded_row_as_unpadded(eos_pad_model, control, pad_token_id):
    model = eos_pad_model
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(4, 60, (n,), generator=g) for n in (5, 2, 7, 3)]
    kw = dict(max_new_tokens=NEW, compile=False, seed=3)
    if pad_token_id is not None:
        kw["pad_token_id"] = pad_token_id
    controls = PAD_CONTROLS[control]

    def alone(b, ctl):
        ids = rows[b][None].expand(len(rows), -1)  # copies: stream b draws the noise it draws in the batch
        return model.generate(ids, **ctl, **kw)

    if controls == "bad_words":
        first = int(alone(1, {})["lm"][0, 0])
        controls = dict(bad_words_ids=[[EOS, *rows[1].tolist(), first], [PAD, first], [EOS, first]])
    want = {b: alone(b, controls) for b in range(len(rows))}
    R = controls.get("num_return_sequences", 1)
    T = 9
    for side in ("left", "right", "mixed"):
        for fill in ("pad", "eos", "own"):
            ids, mask = padded(rows, side, width=T)
            for b in range(len(rows)):
                own = want[b]["lm"][b * R].tolist() * T
                slot = {"pad": PAD, "eos": EOS}.get(fill)
                ids[b][mask[b] == 0] = torch.tensor(own[: int((mask[b] == 0).sum())]) if slot is None else slot
            got = model.generate(ids, mask, **controls, **kw)
            for head in got:
                for b in range(len(rows)):
                    sl = slice(b * R, (b + 1) * R)
                    a, w = got[head][sl], want[b][head][sl]
                    n = max(a.size(1), w.size(1))  # trailing columns differ only by batch-level trimming
                    a = torch.nn.functional.pad(a, (0, n - a.size(1)), value=-1)
                    w = torch.nn.functional.pad(w, (0, n - w.size(1)), value=-1)
                    pad_out = pad_token_id if pad_token_id is not None else EOS
                    same = torch.where(a == -1, pad_out, a).equal(torch.where(w == -1, pad_out, w))
                    assert same, (control, side, fill, head, b, got[head][sl].tolist(), want[b][head][sl].tolist())
