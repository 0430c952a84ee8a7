"""export_hf: one head of a MultiHeadGPT2 -> a transformers GPT2LMHeadModel folder, checked by loading it
with transformers 4.57.6 (model and slow tokenizer) and back with gpt2mh."""
import functools
import json
import warnings

import pytest
import torch
import transformers
from conftest import RINNA_FIXTURE, hf_logits, left_padded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from gpt2mh import GPT2Config, MultiHeadGPT2
from gpt2mh.tokenizer import PACKAGED_MODEL, Tokenizer
from gpt2mh.weights.export import export_hf, export_hf_from_checkpoint

HEADS = ("a", "b", "c")
# rinna's vocab and special ids (the real tokenizer is exported), a tiny trunk; distinct dropouts so
# a dropped or swapped value in config.json shows.
CONFIG = GPT2Config(vocab_size=32000, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                    bos_token_id=1, eos_token_id=2, pad_token_id=3,
                    embd_pdrop=0.05, attn_pdrop=0.07, resid_pdrop=0.09)
ATOL = 1e-5  # fp32 both sides, 2 layers of width 32: observed diffs are ~1e-7
JAPANESE = [
    "生命、宇宙、そして万物についての究極の疑問の答えは",
    "吾輩は猫である。名前はまだ無い。",
    "今日はとても良い天気ですね",
    "東京都渋谷区の駅前で、友達と待ち合わせをしました。",
    "ｶﾀｶﾅとﾊﾝｶｸ、全角１２３も。",
]
MIXED_CASE = "GPT-2はOpenAIが開発した言語モデルです。"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(42)
    m = MultiHeadGPT2(CONFIG, HEADS)
    with torch.no_grad():
        # Every parameter random (HF's zero biases / unit LayerNorms would hide a swapped key) and
        # every head different, so exporting the wrong head cannot pass.
        for name, p in m.transformer.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if name.endswith(".bias") or ".ln_" in name else 0.02))
        m.heads.normal_(0.0, 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {h: export_hf(model, h, root / h) for h in HEADS}


@pytest.fixture(scope="module")
def hf_models(exported):
    return {h: transformers.AutoModelForCausalLM.from_pretrained(p, attn_implementation="eager").eval()
            for h, p in exported.items()}


def hf_tokenizers(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [transformers.T5Tokenizer.from_pretrained(folder),
                transformers.AutoTokenizer.from_pretrained(folder, use_fast=False)]


# ---- the model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("head", HEADS)
def test_logits_match_hf(model, hf_models, head):
    hf = hf_models[head]
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=g)
    ids_p, mask = left_padded(3, 12, CONFIG.vocab_size, pad_id=CONFIG.pad_token_id, generator=g)
    (i,) = model.head_index(head)
    with torch.no_grad():
        every = model(ids)  # (N, B, T, V)
        ours, ours_p = every[i], model(ids_p, mask)[i]
    torch.testing.assert_close(hf_logits(hf, ids), ours, atol=ATOL, rtol=0)
    real = mask.bool()  # pad positions' outputs are never used and differ by design
    torch.testing.assert_close(hf_logits(hf, ids_p, mask)[real], ours_p[real], atol=ATOL, rtol=0)
    others = [j for j in range(len(HEADS)) if j != i]
    assert all((every[j] - ours).abs().max() > 1.0 for j in others)  # the heads really differ


@pytest.mark.parametrize("head", HEADS)
def test_greedy_generate_matches_hf(model, hf_models, head):
    g = torch.Generator().manual_seed(2)
    ids, mask = left_padded(3, 7, CONFIG.vocab_size, pad_id=CONFIG.pad_token_id, generator=g)
    ids = ids.masked_fill(mask.bool() & (ids < 7), 100)  # no special ids inside the prompts
    with torch.no_grad():
        hf_out = hf_models[head].generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                                          pad_token_id=CONFIG.pad_token_id)
    ours = model.generate(ids, mask, heads=[head], max_new_tokens=10, compile=False)[head]
    assert torch.equal(hf_out[:, ids.size(1):], ours)


def test_files_config_and_weights(model, exported, hf_models):
    out = exported["b"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "spiece.model", "tokenizer_config.json", "special_tokens_map.json",
         ])  # no tokenizer.json: no fast tokenizer gives gpt2mh's ids (test_no_fast_tokenizer_is_claimed)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 3)
    assert (cfg["embd_pdrop"], cfg["attn_pdrop"], cfg["resid_pdrop"]) == (0.05, 0.07, 0.09)
    hf = hf_models["b"]
    assert (hf.config.embd_pdrop, hf.config.attn_pdrop, hf.config.resid_pdrop) == (0.05, 0.07, 0.09)
    assert hf.config.n_inner == 48 and hf.config.tie_word_embeddings is False

    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        keys = set(st.keys())
        lm_head = st.get_tensor("lm_head.weight")
    assert "transformer.h.0.attn.c_attn.weight" in keys and "heads" not in keys
    assert torch.equal(lm_head, model.heads[1].t())  # [vocab, n_embd], head "b"
    # Nothing missing or unexpected for transformers, and the head is its own tensor (not wte).
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    assert torch.equal(hf.lm_head.weight, model.heads[1].t())
    assert torch.equal(hf.transformer.wte.weight, model.transformer.wte.weight)


def test_round_trip_into_gpt2mh(model, exported):
    back = MultiHeadGPT2.from_pretrained(exported["c"])
    assert back.head_names == ("lm",) and back.config == CONFIG
    assert torch.equal(back.heads[0], model.heads[2])
    ours = {k: v for k, v in model.state_dict().items() if k != "heads"}
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.items())
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids)[0], model(ids)[2])


# ---- the tokenizer -----------------------------------------------------------------------------
def test_tokenizer_loads_as_rinnas(exported):
    ours = Tokenizer.from_pretrained(RINNA_FIXTURE)
    assert (exported["a"] / "spiece.model").read_bytes() == RINNA_FIXTURE.read_bytes()
    for tok in hf_tokenizers(exported["a"]):
        assert type(tok) is transformers.T5Tokenizer and len(tok) == 32000
        assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == list(range(7))
        assert tok.model_max_length == CONFIG.n_positions
        for text in JAPANESE + ["こんにちは</s>世界[SEP]です"]:
            assert tok.encode(text) == ours.encode(text), text
        assert tok.encode(JAPANESE[0]) == [9, 4523, 7, 1048, 7, 862, 321, 280, 3226, 21075, 10, 5921, 10, 7124, 11, 2]


def test_do_lower_case_is_ignored_on_load_as_for_rinna(exported):
    """transformers 4.57.6 keeps `do_lower_case: true` from tokenizer_config.json in `init_kwargs` only:
    T5Tokenizer has no such argument and never sets the attribute that `tokenize` checks, so the loaded
    tokenizer does NOT lowercase ("GPT" -> <unk>). Users set `tok.do_lower_case = True` by hand, exactly
    as with rinna's hub tokenizer; then the ids equal gpt2mh.Tokenizer's."""
    assert transformers.__version__ == "4.57.6"
    ours = Tokenizer.from_pretrained(RINNA_FIXTURE)
    for tok in hf_tokenizers(exported["a"]):
        assert tok.init_kwargs["do_lower_case"] is True
        assert not getattr(tok, "do_lower_case", False)
        assert tok.encode(MIXED_CASE) == [9, 0, 2269, 11, 0, 17829, 0, 9568, 1040, 693, 2767, 8, 2]
        tok.do_lower_case = True
        assert tok.encode(MIXED_CASE) == ours.encode(MIXED_CASE) == \
            [3091, 8580, 2269, 11, 10352, 3786, 9568, 1040, 693, 2767, 8, 2]


def test_tokenizer_mismatch_and_no_tokenizer(tmp_path):
    small = MultiHeadGPT2(GPT2Config(vocab_size=101, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=3))
    with pytest.raises(ValueError, match="vocab_size=101"):
        export_hf(small, "lm", tmp_path / "x")
    wrong_ids = MultiHeadGPT2(GPT2Config(vocab_size=32000, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="eos_token_id: config 31999 vs tokenizer 2"):  # default: vocab_size - 1
        export_hf(wrong_ids, "lm", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    out = export_hf(small, "lm", tmp_path / "x", tokenizer=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert transformers.AutoModelForCausalLM.from_pretrained(out).lm_head.weight.shape == (101, 8)


# ---- checkpoints and the target folder ----------------------------------------------------------
def test_export_from_checkpoint(model, tmp_path):
    ckpt = model.save_pretrained(tmp_path / "ckpt", tokenizer=Tokenizer.from_pretrained(RINNA_FIXTURE))
    out = export_hf_from_checkpoint(ckpt, "b", tmp_path / "out")
    assert torch.equal(MultiHeadGPT2.from_pretrained(out).heads[0], model.heads[1])
    assert (out / "spiece.model").read_bytes() == RINNA_FIXTURE.read_bytes()
    (ckpt / "spiece.model").unlink()  # no tokenizer in the checkpoint: the packaged one
    out2 = export_hf_from_checkpoint(ckpt, "a", tmp_path / "out2")
    assert (out2 / "spiece.model").read_bytes() == PACKAGED_MODEL.read_bytes()
    with pytest.raises(KeyError, match="unknown head"):
        export_hf_from_checkpoint(ckpt, "zz", tmp_path / "out3")


def test_unknown_head(model, tmp_path):
    with pytest.raises(KeyError, match=r"unknown head\(s\) \['nope'\].*\['a', 'b', 'c'\]"):
        export_hf(model, "nope", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_rules(model, tmp_path, hf_checkpoint):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a previous gpt2mh export"):
        export_hf(model, "a", target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    _, hf_folder = hf_checkpoint(dict(vocab_size=101, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    before = sorted(p.name for p in hf_folder.iterdir())
    with pytest.raises(FileExistsError):  # a real HF checkpoint is not ours to replace
        export_hf(model, "a", hf_folder)
    assert sorted(p.name for p in hf_folder.iterdir()) == before

    export_hf(model, "a", target, overwrite=True)  # explicit: the whole folder is replaced
    assert not (target / "notes.txt").exists()
    export_hf(model, "c", target)  # a previous export is replaced without asking
    assert torch.equal(MultiHeadGPT2.from_pretrained(target).heads[0], model.heads[2])
    (target / "README.md").write_text("edited by hand")
    with pytest.raises(FileExistsError):
        export_hf(model, "b", target)

    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(model, "b", empty, tokenizer=False)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError):
        export_hf(model, "b", a_file, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "out"]  # no temp folders left


CAPITALS = ["BBCのＮＨＫ記者が2024年に来日した。", "ＧＰＴ-2とOpenAI、全角１２３と半角456、ＡＢＣｄｅｆ。", "Tokyo Tower"]


def test_what_export_hf_prints_gives_gpt2mhs_greedy_output_in_transformers(model, exported, hf_models):
    # The lines `gpt2mh export-hf` prints (gpt2mh/cli.py cmd_export), followed in transformers: ids and
    # greedy continuations equal gpt2mh's on Latin capitals, full-width letters and digits.
    ours_tok = Tokenizer.from_pretrained(RINNA_FIXTURE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = transformers.AutoTokenizer.from_pretrained(exported["b"], use_fast=False)
    plain = [tokenizer.encode(t) for t in CAPITALS]
    tokenizer.do_lower_case = True  # the printed one-liner
    for text, before in zip(CAPITALS, plain):
        ids = tokenizer.encode(text)
        assert ids == ours_tok.encode(text), text
        assert before != ids and 0 in before  # without it: capitals -> <unk>; the line is needed
        assert_same_greedy(hf_models["b"], model, ours_tok, text, ids)


# ---- the exported tokenizer is the tokenizer (issue 28, class 1) ------------------------------------
# Japanese-heavy Unicode: kana, half-width katakana (U+FF61-FF9F), combining and spacing (han)dakuten
# (U+3099-309C), small kana, iteration marks, full-width forms, CJK compatibility (squared words, circled
# numbers, enclosed letters), combining Latin marks, spaces of every width, capitals, the special strings.
JA_ALPHABET = "".join(map(chr, [*range(0x3040, 0x30A0), *range(0x30A0, 0x3100), *range(0xFF61, 0xFFA0),
                               *range(0x3099, 0x309D), *range(0xFF01, 0xFF5F), *range(0x3300, 0x3358),
                               *range(0x2460, 0x24FF, 3), *range(0x3000, 0x3040), *range(0x0300, 0x0370, 5),
                               *range(0x2150, 0x2189, 2), 0xA0, 0x2002, 0x2003, 0x200B, 0xFE0F, 0x1F200]))
JA_TEXT = st.lists(st.one_of(st.sampled_from(JA_ALPHABET), st.sampled_from("AZaz09 ?!\t\n東京大学"),
                             st.sampled_from(["</s>", "<S>", "[SEP]", "  "])), max_size=24).map("".join)


@pytest.fixture(scope="module")
def exported_slow(exported):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.AutoTokenizer.from_pretrained(exported["b"], use_fast=False)
    tok.do_lower_case = True  # the printed line
    return tok


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=JA_TEXT)
def test_the_exported_tokenizer_gives_gpt2mhs_ids_on_japanese_unicode(exported, exported_slow, text):
    ours = Tokenizer.from_pretrained(RINNA_FIXTURE)
    assert exported_slow.encode(text) == ours.encode(text), ascii(text)
    if (exported["b"] / "tokenizer.json").exists():  # a fast tokenizer the export claims: it must agree too
        assert fast_of(exported["b"]).encode(text) == ours.encode(text), ascii(text)


@functools.lru_cache(maxsize=None)
def fast_of(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_the_exported_tokenizer_gives_gpt2mhs_ids_on_every_corpus_sentence(exported_slow):
    from gpt2mh.demo.corpus import build_examples

    ours = Tokenizer.from_pretrained(RINNA_FIXTURE)
    texts = {t for split in ("train", "test") for e in build_examples(split) for t in (e.input, *e.targets.values())}
    wrong = [t for t in sorted(texts) if exported_slow.encode(t) != ours.encode(t)]
    assert len(texts) > 1000 and not wrong, wrong[:5]


def test_no_fast_tokenizer_is_claimed(exported):
    # transformers' own conversion of spiece.model (what AutoTokenizer builds without tokenizer.json) and the
    # tokenizer.json gpt2mh used to write both normalise per grapheme: they differ from SentencePiece here.
    assert not (exported["b"] / "tokenizer.json").exists()
    ours = Tokenizer.from_pretrained(RINNA_FIXTURE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = transformers.AutoTokenizer.from_pretrained(exported["b"], use_fast=True)
    gaps = [t for t in ("か\u3099", "ｶﾞｷﾞ", "は\u309a", "（\u0346") if fast.encode(t) != ours.encode(t)]
    assert gaps, "the fast tokenizer now matches: tokenizer.json could be written again"


def assert_same_greedy(hf_model, model, ours_tok, text: str, ids: list[int]) -> None:
    """8 greedy tokens of the exported head "b" in transformers (from the HF tokenizer's ids) == gpt2mh's."""
    from gpt2mh.inputs import encode_prompts

    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8,
                                   pad_token_id=CONFIG.pad_token_id)
    input_ids, mask = encode_prompts(ours_tok, [text], model)
    ours = model.generate(input_ids, mask, heads=["b"], max_new_tokens=8, compile=False)["b"]
    assert torch.equal(hf_out[:, len(ids):], ours), text


def test_export_cli_says_to_load_the_slow_tokenizer():
    from gpt2mh.weights.export import FAST_TOKENIZER_GAP

    assert "fast tokenizer" in FAST_TOKENIZER_GAP and "slow" in FAST_TOKENIZER_GAP
