import inspect
import pickle
import re
import sys
import unicodedata

import pytest

from gpt2mh.demo import corpus
from gpt2mh.demo.corpus import (
    HEADS,
    Token,
    build_examples,
    corpus_path,
    entities,
    load_sentences,
    parse_iob,
    write_dataset,
)
from gpt2mh.train.data import read_examples


def is_katakana(ch):
    return "\u30a0" <= ch <= "\u30ff"


def test_split_sizes_match_the_package():
    train, test = load_sentences()
    assert (len(train), len(test)) == (450, 50)
    assert all(isinstance(t, Token) for sent in train + test for t in sent)
    assert len(build_examples("train")) == 450 and len(build_examples("test")) == 50
    with pytest.raises(ValueError, match="split"):
        build_examples("dev")


def test_first_sentence():
    ex = build_examples("train")[0]
    assert ex.input.startswith("2005年7月14日、南アフリカ共和国ダーバンで")
    assert ex.targets["entities"].startswith("2005年7月14日/dat 南アフリカ共和国ダーバン/loc 世界遺産会議/org")
    assert ex.targets["tense"] == "過去"  # …登録が決まった。
    assert ex.targets["pos"].startswith("名名名名名名記名")  # 2005 年 7 月 14 日 、 南アフリカ
    assert ex.source == "iob_sents.txt:1"
    reading = ex.targets["reading"]  # an extra target for rinna fine-tuning, not a quickstart head
    assert reading.startswith("2005ネン7ツキ14ニチ、ミナミアフリカキョウワコクダーバンデ")
    # Every token here has a dictionary reading or is a number: katakana, digits, punctuation only.
    assert all(is_katakana(c) or c.isdigit() or unicodedata.category(c)[0] == "P" for c in reading)


def test_every_example_has_all_three_targets():
    train, test = load_sentences()
    for sent, ex in zip(train + test, build_examples("train") + build_examples("test")):
        assert set(ex.targets) == {*HEADS, corpus.READING}
        assert all(ex.targets[h].strip() for h in ex.targets)
        assert ex.input and " " not in ex.input
        assert ex.targets["tense"] in (corpus.PAST, corpus.NON_PAST)
        assert len(ex.targets["pos"]) == len(sent) and set(ex.targets["pos"]) <= set(corpus.POS_CODES.values())


def test_targets_survive_the_tokenizer():
    # what is stored is what a model with rinna's tokenizer can generate (it lowercases, NFKC-normalises)
    from gpt2mh.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(None)
    for ex in build_examples("train") + build_examples("test"):
        for h, target in ex.targets.items():
            assert tok.decode(tok.encode(target)) == target, (h, target)
    assert corpus.producible("ＮＨＫ/LOC") == "nhk/loc"


def test_tense_labels_the_final_predicate():
    ex = {e.input: e.targets["tense"] for e in build_examples("test")}
    assert ex["タバはイスラエルからの観光客に人気のあるリゾート地である。"] == "現在"
    labels = [e.targets["tense"] for e in build_examples("train")]
    assert 0.3 < labels.count("過去") / len(labels) < 0.7  # both labels common: a constant answer is weak


def test_readings_are_katakana_unless_the_corpus_has_none():
    train, test = load_sentences()
    tokens = [t for sent in train + test for t in sent]
    assert all(t.reading and t.reading != "*" for t in tokens)
    for t in tokens:
        assert not any("\u3041" <= c <= "\u309f" for c in t.reading), t  # no hiragana left
        other = [c for c in t.reading if not (is_katakana(c) or c.isdigit() or c in "々")
                 and unicodedata.category(c)[0] not in "PSZ"]
        assert not other or t.reading == t.surface, t  # Latin words, unknown kanji: kept as written
    by_surface = {t.surface: t.reading for t in tokens}
    assert by_surface["2005"] == "2005"
    assert by_surface["ゅかわ"] == "ュカワ"  # unknown hiragana word -> katakana


def test_pos_codes_match_tokens_and_entities_are_typed():
    train, _ = load_sentences()
    codes = {c: pos for pos, c in corpus.POS_CODES.items()}
    assert len(codes) == len(corpus.POS_CODES)  # one character per part of speech, none shared
    for sent, ex in zip(train, build_examples("train")):
        assert [codes[c] for c in ex.targets["pos"]] == [t.pos for t in sent]
        assert ex.input == "".join(t.surface for t in sent)
        types = [etype.lower() for _, etype in entities(sent)]
        assert re.findall(r"/([a-z]+)(?= |$)", ex.targets["entities"]) == types  # text/type, lower case
        assert set(types) <= {"art", "dat", "loc", "mon", "org", "per", "psn", "tim"}
        assert (ex.targets["entities"] == "なし") == (not types)
    assert sum(ex.targets["entities"] == "なし" for ex in build_examples("train")) > 0


def line(surface, tag, pos="名詞", reading=None):
    fields = [surface, "OTHER", pos, "一般", "*", "*", "*", "*"]
    fields += [surface, reading, reading] if reading else ["*"]
    return "\t".join([*fields, tag])


def test_parse_iob_edge_cases():
    text = "\n".join([
        line("東京", "I-LOC", reading="トウキョウ"),  # I- without B- starts an entity
        line("で", "O", pos="助詞", reading="デ"),
        line("ＡＢ", "B-ORG"),
        line("１２", "I-ORG"),
        line("あい", "I-PSN"),  # type change under I- starts a new entity
        "",
        "",
        line("\u3000", "O", pos="記号", reading="\u3000") + "\r",
        "",
    ])
    sentences = parse_iob(text)
    assert [start for start, _ in sentences] == [1, 8]
    tokens = sentences[0][1]
    assert [t.reading for t in tokens] == ["トウキョウ", "デ", "ＡＢ", "12", "アイ"]
    assert entities(tokens) == [("東京", "LOC"), ("ＡＢ１２", "ORG"), ("あい", "PSN")]
    assert sentences[1][1] == [Token("\u3000", "記号", "\u3000", "O")]  # U+3000 surface survives
    assert corpus.to_example(sentences[1][1], "x:8").targets["entities"] == "なし"


@pytest.mark.parametrize("bad,match", [("onlyonefield", "x.txt:2: expected TAB-separated"),
                                       ("a\tb\tS-LOC", "x.txt:2: 'S-LOC' is not an IOB2 tag")])
def test_parse_iob_rejects_malformed_lines(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_iob(line("a", "O") + "\n" + bad + "\n", name="x.txt")


def test_write_dataset_round_trips(tmp_path):
    paths = write_dataset(tmp_path / "hiron")
    assert set(paths) == {"train", "test"}
    test, report = read_examples(paths["test"], list(HEADS))
    assert report.kept == 50 and report.skipped == {}
    assert report.ignored_columns == []  # only the quickstart's heads are written
    assert [(ex.input, ex.targets) for ex in test] == [
        (ex.input, {h: ex.targets[h] for h in HEADS}) for ex in build_examples("test")]


def test_no_pickle_and_no_import_of_the_package_parser(monkeypatch):
    assert "pickle" not in inspect.getsource(corpus)
    assert corpus_path().name == "iob_sents.txt"

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    corpus._sentences.cache_clear()
    load_sentences()
    assert "hironsan.corpus" not in sys.modules  # its __init__ parses the corpus at import time
