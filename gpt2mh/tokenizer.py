"""rinna's Japanese GPT-2 tokenizer: SentencePiece plus the rules of HF's slow T5Tokenizer.

rinna users build `T5Tokenizer(spiece.model, extra_ids=0, unk/bos/eos/pad/cls/sep/mask tokens)` and set
`do_lower_case = True` by hand. This class gives the same ids and strings (checked against transformers
4.57.6 in tests/test_tokenizer.py) without importing transformers. The quirks copied on purpose are
marked "HF:".
"""
from __future__ import annotations

import numbers
import re
from pathlib import Path

import sentencepiece as spm
import torch

from .atomic import atomic_write_bytes

PACKAGED_MODEL = Path(__file__).parent / "assets" / "spiece.model"
MODEL_NAME = "spiece.model"
SPECIAL_STRINGS = ("<unk>", "<s>", "</s>", "[PAD]", "[CLS]", "[SEP]", "[MASK]")
REQUIRED = ("<unk>", "<s>", "</s>", "[PAD]")


def _lower(text: str) -> str:
    # HF lowercases with re.sub(r"(.+?)", ...), i.e. one character at a time, so a final capital sigma
    # becomes σ, not the ς that str.lower() picks from context (CPython's only context-dependent case).
    if "Σ" in text:
        return "".join(map(str.lower, text))
    return text.lower()


def check_text(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"expected text as a str, got {type(text).__name__}")
    # A lone surrogate (e.g. from bytes decoded with errors="surrogateescape") is not Unicode text:
    # SentencePiece cannot take it, so name it here instead of failing inside the C++ binding.
    bad = _SURROGATE.search(text)
    if bad:
        raise ValueError(f"text holds a lone surrogate U+{ord(bad.group()):04X} at index {bad.start()}, which is not "
                         f"valid Unicode; decode the source bytes with errors='replace' or fix its encoding")


_SURROGATE = re.compile("[\ud800-\udfff]")


class Tokenizer:
    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"no SentencePiece model file at {self.model_file}")
        # Kept in memory: `save` must not depend on the file still being there (a resumed training run
        # reads its tokenizer from a checkpoint folder that pruning later deletes).
        self._model_bytes = self.model_file.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._model_bytes)
        except RuntimeError as e:
            raise ValueError(f"{self.model_file} is not a SentencePiece model ({e})") from None
        # A special string counts only if the vocab holds it as its own piece (piece_to_id maps misses to unk).
        to_id = {s: self._sp.piece_to_id(s) for s in SPECIAL_STRINGS}
        self.special_tokens = {s: i for s, i in to_id.items() if self._sp.id_to_piece(i) == s}
        missing = [s for s in REQUIRED if s not in self.special_tokens]
        if missing:
            raise ValueError(f"{self.model_file} lacks the special tokens {missing} of rinna's tokenizer")
        self._special_ids = frozenset(self.special_tokens.values())
        # Longest first, so a match at one position is the longest one (HF's trie does the same).
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @classmethod
    def from_pretrained(cls, src: str | Path | None = None) -> Tokenizer:
        if src is None:
            return cls(PACKAGED_MODEL)
        path = Path(src)
        if path.is_dir():
            path = path / MODEL_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {path}: need a folder holding {MODEL_NAME} or the path of a .model file"
            )
        return cls(path)

    @classmethod
    def for_model(cls, folder: str | Path) -> Tokenizer:
        """The tokenizer of a model folder: its own spiece.model, else the packaged rinna one."""
        own = Path(folder) / MODEL_NAME
        return cls(own if own.is_file() else PACKAGED_MODEL)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def model_proto(self) -> bytes:
        """The SentencePiece model file's bytes."""
        return self._model_bytes

    def pieces(self) -> list[tuple[str, float]]:
        """(piece, score) for every id: the Unigram vocabulary."""
        return [(self._sp.id_to_piece(i), self._sp.get_score(i)) for i in range(self.vocab_size)]

    @property
    def unk_id(self) -> int:
        return self.special_tokens["<unk>"]

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<s>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["</s>"]

    @property
    def pad_id(self) -> int:
        return self.special_tokens["[PAD]"]

    def _split(self, text: str) -> list[str]:
        # re.split with one capture group: even indices are plain text, odd ones special strings.
        return self._split_re.split(text)

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        check_text(text)
        # HF: lowercase outside the special strings *of the original text*, then look for special strings
        # again in the lowercased text, so "<S>" or "</S>" become <s> / </s> ids.
        parts = self._split(text)
        lowered = "".join(p if i % 2 else _lower(p) for i, p in enumerate(parts))
        ids: list[int] = []
        for i, part in enumerate(self._split(lowered)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                # HF: each segment is encoded on its own, so SentencePiece adds its "▁" dummy prefix after
                # every special token and drops whitespace at segment edges ("a </s> b" == "a</s>b").
                # Ids come via the pieces, as HF's convert_tokens_to_ids does.
                ids += self._sp.piece_to_id(self._sp.encode(part, out_type=str))
        # HF: </s> is appended only if the ids do not already end with it ("x</s>" -> [.., 2], not [.., 2, 2]).
        if add_eos and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"decode takes a sequence of token ids, got {type(ids).__name__} {ids!r:.40}")
        for i in ids:
            if not isinstance(i, numbers.Integral) or isinstance(i, bool):
                raise TypeError(f"token ids must be integers, got {i!r} ({type(i).__name__})")
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        ids = [int(i) for i in ids]
        tokens = [self._sp.id_to_piece(i) for i in ids if not (skip_special_tokens and i in self._special_ids)]
        if not tokens:
            return ""
        # HF: T5Tokenizer strips the first token's "▁" itself (add_prefix_space) before SentencePiece decodes.
        tokens[0] = tokens[0].removeprefix("▁")
        out: list[str] = []
        run: list[str] = []  # plain pieces since the last special token
        prev_special = False
        for tok in tokens:
            if tok in self.special_tokens:
                # HF: the space goes *before* the preceding text run, not between it and the special token:
                # [a, </s>, b] -> " a</s>b" -> "a</s>b"; [<s>, a] -> " <s>a"; [<s>, ▁, </s>] -> "<s> </s>".
                if not prev_special:
                    out.append(" ")
                out += [self._sp.decode_pieces(run), tok]
                run, prev_special = [], True
            else:
                run.append(tok)
                prev_special = False
        out.append(self._sp.decode_pieces(run))
        return "".join(out).strip()

    def batch_encode(
        self, texts: list[str], add_eos: bool = True, max_length: int | None = None
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        if isinstance(texts, str):  # a str is a sequence too: each character would become a row
            raise TypeError("batch_encode takes a list of strings, got one str; use [text] or encode(text)")
        texts = list(texts)  # a numpy array of strings has no truth value; a generator no len
        if not texts:
            raise ValueError("batch_encode needs at least one text")
        rows = [self.encode(t, add_eos=add_eos) for t in texts]
        if max_length is not None:
            for i, row in enumerate(rows):
                if len(row) > max_length:
                    raise ValueError(f"text {i} is {len(row)} tokens long, over max_length={max_length}")
        T = max(len(r) for r in rows)
        # Left padding, so every row's last real token sits at position T-1 for generation.
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T), 1 on real tokens
        for b, row in enumerate(rows):
            if row:
                input_ids[b, T - len(row) :] = torch.tensor(row, dtype=torch.long)
                attention_mask[b, T - len(row) :] = 1
        return input_ids, attention_mask

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / MODEL_NAME
        if dst.is_file() and dst.read_bytes() == self._model_bytes:
            return dst

        return atomic_write_bytes(dst, self._model_bytes)
