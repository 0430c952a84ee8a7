import inspect
import pickle
import sys
import unicodedata

import pytest

from gpt2mh import corpus
from gpt2mh.corpus import (
    HEADS,
    Token,
    build_examples,
    corpus_path,
    entities,
    load_sentences,
    parse_iob,
    write_dataset,
)
from gpt2mh.data import read_examples


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
    assert ex.targets["entities"].startswith("2005年7月14日/DAT 南アフリカ共和国ダーバン/LOC 世界遺産会議/ORG")
    assert ex.targets["reading"].startswith("2005ネン7ツキ14ニチ、ミナミアフリカキョウワコクダーバンデ")
    assert ex.targets["pos"].startswith("名詞 名詞 名詞 名詞 名詞 名詞 記号 名詞")
    assert ex.source == "iob_sents.txt:1"
    # Every token here has a dictionary reading or is a number: katakana, digits, punctuation only.
    assert all(is_katakana(c) or c.isdigit() or unicodedata.category(c)[0] == "P" for c in ex.targets["reading"])


def test_every_example_has_all_three_targets():
    for ex in build_examples("train") + build_examples("test"):
        assert set(ex.targets) == set(HEADS)
        assert all(ex.targets[h].strip() for h in HEADS)
        assert ex.input and " " not in ex.input
        assert len(ex.targets["pos"].split(" ")) == len(ex.targets["pos"].split())


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


def test_pos_counts_match_tokens_and_entities_are_typed():
    train, _ = load_sentences()
    for sent, ex in zip(train, build_examples("train")):
        assert ex.targets["pos"].split(" ") == [t.pos for t in sent]
        assert ex.input == "".join(t.surface for t in sent)
        if ex.targets["entities"] != "なし":
            for item in ex.targets["entities"].split(" "):
                text, _, etype = item.rpartition("/")
                assert text in ex.input and etype in {"ART", "DAT", "LOC", "MON", "ORG", "PER", "PSN", "TIM"}
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
    assert [(ex.input, ex.targets) for ex in test] == [(ex.input, ex.targets) for ex in build_examples("test")]


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
