"""gpt2mh.tokenizer.Tokenizer against transformers 4.57.6's slow T5Tokenizer, built as rinna users build it."""

import hashlib
import os
import string
import unicodedata
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2mh.tokenizer import PACKAGED_MODEL, Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "rinna" / "spiece.model"
SHA256 = "b5cbdfa8aa7c54c8c5af85b78c309c54a5f2749a20468bf6f60eee007fe6fec1"

HANDMADE = [
    "",
    " ",
    "   ",
    "\t\n \u3000",
    "GPT-2はOpenAIが開発した言語モデルです。",
    "Hello World, THIS is MiXeD CaSe 123",
    "ＡＢＣ１２３ａｂｃ",
    "ｶﾀｶﾅとﾊﾝｶｸ ｶﾞｷﾞ",
    "絵文字😀🎉👨‍👩‍👧 です",
    "こんにちは</s>世界",
    "[SEP]",
    "[SEP]x",
    "<s>",
    "<s>x</s>",
    "[MASK]です",
    "a</s> b",
    "a </s>b",
    "x</s>",  # already ends with </s>: T5Tokenizer adds no second one
    "x</s></s>",
    "<S>大文字の</S>",  # lowercased into special strings, which T5Tokenizer then matches
    "[sep] [Sep] <UNK> <unk>",
    "[PAD][CLS][SEP][MASK]",
    "ΟΔΟΣ Σ",  # per-character lowercasing: σ, never the final ς
    "İstanbul",
    "tab\there\nnew\r\nline",
    "前  後　　空白  ",
    "▁already▁escaped ▁",
    "あ" * 2000,
    "ab" * 1000 + "</s>" * 3,
    "日本語 English 日本語" * 50,
]


def corpus_sentences() -> list[str]:
    # The surfaces of every hironsancorpus sentence, read by gpt2mh.corpus (which never imports the
    # package's own parser or pickle).
    from gpt2mh.demo.corpus import load_sentences

    train, test = load_sentences()
    return ["".join(t.surface for t in sent) for sent in train + test]


CORPUS = corpus_sentences()


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    assert transformers.__version__ == "4.57.6"  # 5.x builds a broken vocab from vocab_file (see README)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = transformers.T5Tokenizer(
            str(FIXTURE),
            extra_ids=0,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            additional_special_tokens=[],
        )
    t.do_lower_case = True  # rinna's config sets it, but loading drops it: users set it by hand
    return t


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(FIXTURE)


def hf_encode(hf, text, add_eos=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "This sequence already has </s>"
        return hf.encode(text, add_special_tokens=add_eos)


def normalised(text: str) -> str:
    # What decode(encode(text)) gives for plain text: lowercase, then SentencePiece's nmt_nfkc, which is
    # NFKC except that it keeps the full-width tilde "～" (NFKC makes it "~"; checked over all of Unicode,
    # the other differences are control and rare modifier characters), then whitespace runs collapsed to
    # one space and trimmed.
    nfkc = "～".join(unicodedata.normalize("NFKC", part) for part in text.lower().split("～"))
    return " ".join(nfkc.split())


# --- the model file and its special tokens ---------------------------------------------------------


def test_packaged_model_is_rinnas():
    for path in (PACKAGED_MODEL, FIXTURE):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256
        assert (path.parent / "NOTICE").is_file()


def test_sizes_and_special_ids(tok):
    assert tok.vocab_size == len(tok) == 32000
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    names = ["<unk>", "<s>", "</s>", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.special_tokens == {name: i for i, name in enumerate(names)}
    assert tok.model_file == FIXTURE


def test_from_pretrained(tmp_path):
    assert Tokenizer.from_pretrained().model_file == PACKAGED_MODEL
    assert Tokenizer.from_pretrained(FIXTURE.parent).model_file == FIXTURE
    assert Tokenizer.from_pretrained(str(FIXTURE)).model_file == FIXTURE
    with pytest.raises(FileNotFoundError, match="spiece.model") as e:
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    assert "nowhere" in str(e.value)
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        Tokenizer.from_pretrained(tmp_path)  # a folder without spiece.model


def test_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="garbage.model"):
        Tokenizer(garbage)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model"):
        Tokenizer(empty)


def test_save(tok, tmp_path):
    out = tok.save(tmp_path / "ckpt")
    assert out == tmp_path / "ckpt" / "spiece.model"
    assert out.read_bytes() == FIXTURE.read_bytes()
    assert Tokenizer.from_pretrained(tmp_path / "ckpt").encode("テスト") == tok.encode("テスト")
    again = Tokenizer(out)
    assert again.save(tmp_path / "ckpt") == out  # saving onto itself is a no-op


# --- encode ------------------------------------------------------------------------------------------


def test_readme_ids(tok):
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE))
    life = "生命、宇宙、そして万物についての究極の疑問の答えは"
    life_ids = [9, 4523, 7, 1048, 7, 862, 321, 280, 3226, 21075, 10, 5921, 10, 7124, 11]
    assert tok.encode(life) == life_ids + [2]
    assert tok.encode(life, add_eos=False) == life_ids
    gpt = "GPT-2はOpenAIが開発した言語モデルです。"
    assert tok.encode(gpt) == [3091, 8580, 2269, 11, 10352, 3786, 9568, 1040, 693, 2767, 8, 2]
    # Why lowercasing matters: the vocab has no uppercase Latin letters.
    assert sp.encode(gpt) == [9, 0, 2269, 11, 0, 17829, 0, 9568, 1040, 693, 2767, 8]


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 300
    assert all(CORPUS)


@pytest.mark.parametrize("texts", [CORPUS, HANDMADE], ids=["corpus", "handmade"])
def test_encode_decode_match_t5tokenizer(hf, tok, texts):
    for text in texts:
        ids = hf_encode(hf, text)
        assert tok.encode(text) == ids, text
        assert tok.encode(text, add_eos=False) == hf_encode(hf, text, add_eos=False), text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text


def test_quirks_of_t5tokenizer(tok):
    # Each segment between special tokens gets its own "▁" prefix; whitespace next to them is dropped.
    assert tok.encode("こんにちは</s>世界") == [9, 30442, 11, 2, 13618, 2]
    assert tok.encode("a</s> b") == tok.encode("a </s>b") == tok.encode("a</s>b") == [999, 2, 1811, 2]
    assert tok.encode("[SEP]x") == [5, 4295, 2]
    assert tok.encode("x</s>") == [4295, 2]  # no second </s>
    assert tok.encode("<S>") == [1, 2]  # "<S>" lowercases to the special "<s>"
    assert tok.encode("[sep]")[:-1] != [5]  # ...but "[SEP]" is matched only in capitals
    assert tok.encode("") == tok.encode(" \t\n") == [2]
    assert tok.encode("", add_eos=False) == []
    assert tok.decode([1, 4295, 2], skip_special_tokens=False) == "<s> x</s>"
    assert tok.decode([999, 2, 1811], skip_special_tokens=False) == "a</s>b"


def test_round_trip_plain_text(tok):
    for text in CORPUS + ["Hello World 123", "ＡＢＣ１２３", "ｶﾀｶﾅ", "  前  後  ", "4～5 ~"]:
        assert tok.decode(tok.encode(text)) == normalised(text), text


# --- decode ------------------------------------------------------------------------------------------


def test_decode_accepts_tensors(tok):
    ids = tok.encode("テンソルから")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids) == "テンソルから"
    assert tok.decode([]) == tok.decode(torch.tensor([], dtype=torch.long)) == ""
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([ids]))


@pytest.mark.parametrize("bad", [32000, -1, 10**9])
def test_decode_rejects_ids_outside_vocab(tok, bad):
    with pytest.raises(ValueError, match=str(bad)):
        tok.decode([9, bad, 100])


# --- batch_encode ------------------------------------------------------------------------------------


def test_batch_encode_left_pads(tok):
    texts = ["短い", "これはもう少し長い文です。", ""]
    rows = [tok.encode(t) for t in texts]
    input_ids, mask = tok.batch_encode(texts)
    T = max(map(len, rows))
    assert input_ids.shape == mask.shape == (3, T)
    assert input_ids.dtype == mask.dtype == torch.long
    for b, row in enumerate(rows):
        pad = T - len(row)
        assert input_ids[b, pad:].tolist() == row
        assert (input_ids[b, :pad] == tok.pad_id).all()
        assert mask[b].tolist() == [0] * pad + [1] * len(row)
    no_eos, _ = tok.batch_encode(["短い"], add_eos=False)
    assert no_eos[0].tolist() == tok.encode("短い", add_eos=False)
    exact, _ = tok.batch_encode(texts, max_length=T)
    assert torch.equal(exact, input_ids)


def test_batch_encode_errors(tok):
    with pytest.raises(ValueError, match="at least one"):
        tok.batch_encode([])
    long = "長い文章です。" * 20
    n = len(tok.encode(long))
    with pytest.raises(ValueError, match=rf"text 1 is {n} tokens long"):
        tok.batch_encode(["短い", long], max_length=n - 1)


# --- properties --------------------------------------------------------------------------------------

# Characters the vocab knows, minus "<" and "[" (they could spell special tokens, which decode drops).
KNOWN = (
    string.ascii_letters
    + string.digits
    + "".join(c for c in string.punctuation if c not in "<[`")
    + " \t\n\u3000"
    + "".join(map(chr, range(0x3041, 0x3094)))  # hiragana ぁ..ん (ゎゔ excepted below)
    + "".join(map(chr, range(0x30A1, 0x30F7)))  # katakana ァ..ヶ (ヮ excepted below)
    + "ＡＢＣａｂｃ１２３～ｶﾀﾅ、。「」・ー日本語生命宇宙万物究極疑問答言開発東京大学"
)
KNOWN = "".join(c for c in KNOWN if c not in "ゎゔヮ")
# Stress the special-token matcher: fragments and whole special strings, in both cases.
SPECIALISH = st.sampled_from(
    list("<>/s[]SEPADCLMKunkx ") + ["<s>", "</s>", "<S>", "[SEP]", "[MASK]", "<unk>", "[pad]"]
)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_any_text_encodes_like_t5tokenizer(hf, tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert ids[-1] == tok.eos_id
    assert ids == hf_encode(hf, text)


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(SPECIALISH, max_size=16))
def test_special_strings_split_like_t5tokenizer(hf, tok, parts):
    text = "".join(parts)
    ids = hf_encode(hf, text)
    assert tok.encode(text) == ids
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=KNOWN))
def test_round_trip_is_normalisation(tok, text):
    ids = tok.encode(text, add_eos=False)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == normalised(text)
