"""hironsancorpus (MIT, 500 Japanese news sentences in IOB2) as a three-head dataset.

One input (the sentence), three targets of completely different kinds:

  tense     a sentence label: 過去 when the sentence's last word before its punctuation is the
            past-tense auxiliary た/だ (…した。 …だった。), else 現在 (non-past: …する。 …している。 …だ。)
  entities  an extraction: the named entities in order as `text/type`, space-separated (types lower
            case: ART DAT LOC MON ORG PER PSN TIM -> art dat ...), or なし when there are none
  pos       a tag sequence: one character per corpus token for its coarse part of speech
            (POS_CODES: 名詞 -> 名, 助詞 -> 助, 動詞 -> 動, 助動詞 -> 補, 記号 -> 記, ...)

Every target is stored as the tokenizer gives it back (decode(encode(target))): rinna's tokenizer
lowercases and NFKC-normalises, so `/LOC` or `ＡＢＣ` could never be generated; the stored reference is
what a perfect model outputs. Examples also carry a fourth target, `reading` (the katakana reading,
READING), which is not a quickstart head: from scratch in the quickstart's budget it scores far below
converting the input's hiragana to katakana (README, "quickstart"); it is there for fine-tuning rinna
(`gpt2mh train --heads reading,...`). write_dataset writes the quickstart's HEADS only.
"""
from __future__ import annotations

import functools
import importlib.util
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

from gpt2mh.train.data import Example, write_jsonl

from ..tokenizer import Tokenizer

HEADS = ("tense", "entities", "pos")  # the quickstart's heads
READING = "reading"  # an extra target of every example (not a quickstart head)
NO_ENTITIES = "なし"
PAST, NON_PAST = "過去", "現在"
POS_CODES = {"名詞": "名", "助詞": "助", "動詞": "動", "助動詞": "補", "記号": "記", "接頭詞": "頭", "接続詞": "接",
             "副詞": "副", "連体詞": "連", "形容詞": "形", "感動詞": "感", "フィラー": "フ"}

OTHER_POS = "他"  # a coarse POS not in POS_CODES (none in the corpus)
TRAIN_FRACTION = 0.9  # the package's own split: first 90% train, rest test
_HIRAGANA_TO_KATAKANA = {c: c + 0x60 for c in [*range(0x3041, 0x3097), 0x309D, 0x309E]}


class Token(NamedTuple):
    surface: str
    pos: str  # coarse part of speech (名詞, 助詞, ...)
    reading: str  # katakana; derived from the surface where the corpus has none
    tag: str  # IOB2: O, B-TYPE, I-TYPE


def corpus_path() -> Path:
    # importlib.resources.files("hironsan.corpus") would import hironsan.corpus, whose __init__ parses
    # the whole file at import time; find_spec on the top-level package locates it without importing.
    spec = importlib.util.find_spec("hironsan")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "corpus" / "iob_sents.txt"
        if path.is_file():
            return path
    raise FileNotFoundError("the demo's data set (the hironsancorpus package) is not installed: "
                            "pip install \"gpt2mh[demo]\" (or hironsancorpus==0.1.2)")


def parse_iob(text: str, name: str = "iob_sents.txt") -> list[tuple[int, list[Token]]]:
    """Sentences as (line of their first token, tokens); blank lines separate sentences."""
    sentences, tokens, start = [], [], 0
    for line, raw in enumerate(text.split("\n"), start=1):
        raw = raw.rstrip("\r")  # not strip(): a surface can be U+3000, which strip() would eat
        if not raw.strip():
            if tokens:
                sentences.append((start, tokens))
            tokens = []
            continue
        if not tokens:
            start = line
        tokens.append(_token(raw, f"{name}:{line}"))
    if tokens:
        sentences.append((start, tokens))
    return sentences


def _token(raw: str, where: str) -> Token:
    # surface, char type, POS x4, conjugation x2, base form, reading, pronunciation, tag.
    # Unknown words stop after the base form, so the tag is always the last field, not field 11.
    fields = raw.split("\t")
    if len(fields) < 2:
        raise ValueError(f"{where}: expected TAB-separated fields (surface ... IOB2 tag), got {raw!r}")
    surface, tag = fields[0], fields[-1]
    if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
        raise ValueError(f"{where}: {tag!r} is not an IOB2 tag (O, B-TYPE, I-TYPE)")
    pos = fields[2] if len(fields) > 3 else "*"
    reading = fields[9] if len(fields) > 10 and fields[9] != "*" else _reading_of(surface)
    return Token(surface, pos, reading, tag)


def _reading_of(surface: str) -> str:
    # No dictionary reading: digits NFKC'd (full-width -> ASCII), hiragana -> katakana, rest kept.
    text = "".join(unicodedata.normalize("NFKC", c) if c.isdecimal() else c for c in surface)
    return text.translate(_HIRAGANA_TO_KATAKANA)


@functools.lru_cache(maxsize=1)
def _sentences() -> tuple[tuple[int, tuple[Token, ...]], ...]:
    text = corpus_path().read_text(encoding="utf-8")
    return tuple((line, tuple(tokens)) for line, tokens in parse_iob(text))


def _split(split: str) -> tuple[tuple[int, tuple[Token, ...]], ...]:
    sentences = _sentences()
    n_train = int(len(sentences) * TRAIN_FRACTION)
    if split == "train":
        return sentences[:n_train]
    if split == "test":
        return sentences[n_train:]
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def load_sentences() -> tuple[list[list[Token]], list[list[Token]]]:
    return tuple([list(tokens) for _, tokens in _split(s)] for s in ("train", "test"))


def entities(tokens: list[Token]) -> list[tuple[str, str]]:
    """(text, TYPE) spans in order; an I- tag that does not continue a span of its type starts one."""
    spans: list[list[str]] = []  # [type, text]
    inside = None
    for tok in tokens:
        kind, _, etype = tok.tag.partition("-")
        if kind == "O":
            inside = None
        elif kind == "I" and inside == etype:
            spans[-1][1] += tok.surface
        else:
            spans.append([etype, tok.surface])
            inside = etype
    return [(text, etype) for etype, text in spans]


def tense(tokens: list[Token]) -> str:
    words = [t for t in tokens if t.pos != "記号"]
    return PAST if words and words[-1].surface in ("た", "だ") and words[-1].pos == "助動詞" else NON_PAST


def pos_codes(tokens: list[Token]) -> str:
    return "".join(POS_CODES.get(t.pos, OTHER_POS) for t in tokens)


def reading_target(tokens: list[Token]) -> str:
    return "".join(t.reading for t in tokens)


@functools.lru_cache(maxsize=1)
def _tokenizer():

    return Tokenizer.from_pretrained(None)  # rinna's, packaged: the quickstart's tokenizer


def producible(text: str) -> str:
    """The text as the tokenizer gives it back: what a model with this tokenizer can generate."""
    tok = _tokenizer()
    return tok.decode(tok.encode(text, add_eos=False))


def to_example(tokens: list[Token], source: str) -> Example:
    spans = entities(tokens)
    targets = {
        "tense": tense(tokens),
        "entities": " ".join(f"{text}/{etype.lower()}" for text, etype in spans) if spans else NO_ENTITIES,
        "pos": pos_codes(tokens),
        READING: reading_target(tokens),
    }
    return Example("".join(t.surface for t in tokens), {h: producible(t) for h, t in targets.items()}, source)


def build_examples(split: str = "train") -> list[Example]:
    return [to_example(list(tokens), f"iob_sents.txt:{line}") for line, tokens in _split(split)]


def longest_matches(text: str, words) -> list[str | None]:
    """text cut left to right into the longest of `words` that starts at each place; None for a
    character no word starts with (the model-free references below)."""
    longest = max(map(len, words), default=0)
    out, i = [], 0
    while i < len(text):
        hit = next((text[i:i + n] for n in range(min(longest, len(text) - i), 0, -1) if text[i:i + n] in words), None)
        out.append(hit)
        i += len(hit) if hit is not None else 1
    return out


def entity_lookup() -> Callable[[str], str]:
    """A reference answer for `entities` that needs no model (not a trivial answer: it knows the
    training set): every entity of the training sentences found in the input, longest first and left
    to right, with its most frequent training type; なし when none is found. It scores what a model
    that learned the training entities by heart and copied them out of its input could reach; on
    the test split 41% of the entities occur among the training ones (the rest needs copying spans
    the model has never seen)."""
    types: dict[str, Counter] = {}
    for _, tokens in _split("train"):
        for text, etype in entities(list(tokens)):
            types.setdefault(text, Counter())[etype.lower()] += 1
    best = {text: c.most_common(1)[0][0] for text, c in types.items()}

    def answer(text: str) -> str:
        found = [f"{hit}/{best[hit]}" for hit in longest_matches(text, best) if hit is not None]
        return producible(" ".join(found)) if found else NO_ENTITIES

    return answer


def pos_lookup() -> Callable[[str], str]:
    """A reference answer for `pos` that needs no model (not a trivial answer: it knows the training
    set): the input cut into training words, longest first and left to right, each tagged with its
    most frequent training POS; a run of characters no training word starts with counts as one 名.
    It scores what a model that learned the training words by heart and aligned its tags with its
    input could reach."""
    tags: dict[str, Counter] = {}
    for _, tokens in _split("train"):
        for t in tokens:
            tags.setdefault(t.surface, Counter())[POS_CODES.get(t.pos, OTHER_POS)] += 1
    best = {w: c.most_common(1)[0][0] for w, c in tags.items()}

    def answer(text: str) -> str:
        out, unknown = [], False
        for hit in longest_matches(text, best):
            if hit is not None:
                out.append(best[hit])
            elif not unknown:  # the first of a run of unmatched characters
                out.append(POS_CODES["名詞"])
            unknown = hit is None
        return producible("".join(out))

    return answer


def write_dataset(folder, heads=HEADS) -> dict[str, Path]:
    """train.jsonl and test.jsonl in folder, with the targets of `heads` (default: the quickstart's)."""
    folder = Path(folder)
    return {split: write_jsonl(folder / f"{split}.jsonl", [
        Example(ex.input, {h: ex.targets[h] for h in heads}, ex.source) for ex in build_examples(split)])
        for split in ("train", "test")}
