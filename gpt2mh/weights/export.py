"""One head -> a plain transformers `GPT2LMHeadModel` folder (config, safetensors, rinna's tokenizer files).

The folder loads with `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`
(the fast tokenizer, from tokenizer.json: written when the optional `tokenizers` package is installed) or
`AutoTokenizer.from_pretrained(out, use_fast=False)`, and back into gpt2mh as a one-head ("lm") model.
It is built in a temporary sibling folder and renamed into place, so a crash never leaves a mix of
two exports or a half-written file (at worst, between moving an old export aside and renaming the new
one in, the old one is left in a hidden `.<name>.old.*.tmp` sibling; see gpt2mh/atomic.py)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..atomic import atomic_dir, atomic_save_file, atomic_write_text, fsync_path
from ..config import CONFIG_JSON
from ..model import GPT2
from ..tokenizer import Tokenizer
from .folder import load_model
from .hf import SAFETENSORS
from .hub import resolve_model

EXPORT_KEY = "gpt2mh_export"  # safetensors metadata of an export: the head it came from
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_JSON = "tokenizer.json"
EXPORT_FILES = frozenset({CONFIG_JSON, SAFETENSORS, "spiece.model", TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP,
                          TOKENIZER_JSON})


# Role names of HF's tokenizer attributes -> rinna's strings.
SPECIAL_ROLES = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]",
                 "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}


def export_hf(model: GPT2, head: str, out_dir: str | Path, tokenizer=None, *,
              overwrite: bool = False, inputs=()) -> Path:
    """Write head `head` of `model` as a transformers GPT-2 folder at `out_dir`; returns its path.

    tokenizer: a `gpt2mh.Tokenizer` (None: the packaged rinna tokenizer; False: no tokenizer files).
    An existing `out_dir` is replaced only if it is empty or a previous export, unless overwrite=True
    (which replaces the whole folder: stale files such as a gpt2mh.json would change how it loads)."""
    if not isinstance(head, str):  # one head per export; a list would unpack badly
        raise TypeError(f"export_hf exports one head: head must be one of {list(model.head_names)}, got {head!r}")
    (index,) = model.head_index(head)  # KeyError naming the model's heads
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    if tokenizer is None:

        tokenizer = Tokenizer.from_pretrained()
    if tokenizer is not False:
        check_tokenizer(model, tokenizer)

    with atomic_dir(out_dir, inputs=inputs, tag="export") as tmp:  # inputs: refused as the output
        write_weights(model, index, tmp / SAFETENSORS)
        atomic_write_text(tmp / CONFIG_JSON, json.dumps(hf_config(model), indent=2) + "\n")
        if tokenizer is not False:
            write_tokenizer(tokenizer, model.config.n_positions, tmp)
    return out_dir


def export_hf_from_checkpoint(src: str | Path, head: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """A gpt2mh (or HF) checkpoint -> `export_hf` of one head, with the checkpoint's own spiece.model
    if it has one, else the packaged rinna tokenizer."""
    folder = resolve_model(src)
    model = load_model(folder)
    tokenizer = Tokenizer.for_model(folder)
    return export_hf(model, head, out_dir, tokenizer, overwrite=overwrite, inputs=[folder])


# ---- contents ---------------------------------------------------------------------------------
def hf_config(model: GPT2) -> dict:
    # to_hf_dict: GPT-2 settings (dropouts, bos/eos/pad ids included), model_type, architectures,
    # tie_word_embeddings=false (the head is its own tensor, not wte).
    d = model.config.to_hf_dict()
    d["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    return d


def write_weights(model: GPT2, index: int, path: Path) -> None:
    # Trunk keys are already HF's (`transformer.h.0.attn.c_attn.weight`, ...); the head goes from
    # Conv1D [C, V] to nn.Linear's lm_head [V, C].
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "heads"}
    tensors["lm_head.weight"] = model.heads[index].detach().cpu().t().contiguous()
    atomic_save_file(tensors, path, metadata={"format": "pt", EXPORT_KEY: model.head_names[index]})


def check_tokenizer(model: GPT2, tokenizer) -> None:
    c = model.config
    if tokenizer.vocab_size > c.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                         f"vocab_size={c.vocab_size}; pass the model's own tokenizer (or tokenizer=False)")
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    wrong = [f"{k}: config {getattr(c, k)} vs tokenizer {v}" for k, v in ids.items()
             if getattr(c, k) is not None and getattr(c, k) != v]
    if wrong:
        raise ValueError(f"the model's config and the tokenizer disagree on special ids ({'; '.join(wrong)}); "
                         f"pass the model's own tokenizer (or tokenizer=False)")


def write_tokenizer(tokenizer, model_max_length: int, folder: Path) -> None:
    """spiece.model + the files that make transformers build rinna's slow T5Tokenizer.

    `do_lower_case` is written as rinna's hub config has it, but transformers 4.57 ignores it on load
    (T5Tokenizer has no such argument; it only lands in `init_kwargs`): set
    `tokenizer.do_lower_case = True` after loading, as rinna's model card says. `legacy: true` pins
    the behaviour rinna users get by default (and gpt2mh.Tokenizer reproduces) without the warning."""
    fsync_path(tokenizer.save(folder))
    specials = {role: s for role, s in SPECIAL_ROLES.items() if s in tokenizer.special_tokens}
    config = dict(tokenizer_class="T5Tokenizer", do_lower_case=True, extra_ids=0, legacy=True,
                  additional_special_tokens=[], model_max_length=model_max_length, **specials)
    atomic_write_text(folder / TOKENIZER_CONFIG, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(folder / SPECIAL_TOKENS_MAP, json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
    fast = fast_tokenizer_json(tokenizer)
    if fast is not None:
        atomic_write_text(folder / TOKENIZER_JSON, fast)


def fast_tokenizer_json(tokenizer) -> str | None:
    """tokenizer.json for transformers' fast tokenizer: what transformers' T5 converter builds from
    spiece.model (Unigram pieces and scores, the model's own NFKC charsmap, Metaspace, `$A </s>`), with
    rinna's lowercasing first, which the slow tokenizer forgets on load. Same ids as gpt2mh.Tokenizer on
    capitals, full-width text and digits (tests/test_export.py); one known difference: a special string
    typed in capitals ("<S>") is matched after lowercasing by gpt2mh only. None when the optional
    `tokenizers` package is not installed (gpt2mh does not need it)."""
    try:
        from tokenizers import (
            AddedToken,
            Regex,
            decoders,
            normalizers,
            pre_tokenizers,
            processors,
        )
        from tokenizers import Tokenizer as FastTokenizer
        from tokenizers.models import Unigram
    except ImportError:
        return None
    fast = FastTokenizer(Unigram(tokenizer.pieces(), unk_id=tokenizer.unk_id, byte_fallback=False))
    charsmap = spm_charsmap(tokenizer.model_proto)
    fast.normalizer = normalizers.Sequence(
        [normalizers.Lowercase()] + ([normalizers.Precompiled(charsmap)] if charsmap else [])
        + [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")])
    fast.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    fast.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    fast.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                        special_tokens=[("</s>", tokenizer.eos_id)])
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    fast.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    return fast.to_str(pretty=True)


def spm_charsmap(proto: bytes) -> bytes:
    """NormalizerSpec.precompiled_charsmap of a SentencePiece model (ModelProto field 3, its field 2),
    read from the protobuf wire format: no protobuf package needed."""
    for number, value in proto_fields(proto):
        if number == 3:
            return next((bytes(v) for n, v in proto_fields(value) if n == 2), b"")
    return b""


def proto_fields(data: bytes):
    """(field number, value) of one protobuf message; length-delimited values as bytes."""
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[i]
            value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
            if byte < 0x80:
                return value, i

    i = 0
    while i < len(data):
        key, i = varint(i)
        kind = key & 7
        if kind == 0:
            value, i = varint(i)
        elif kind in (1, 5):  # fixed 64 / 32 bits
            size = 8 if kind == 1 else 4
            value, i = data[i:i + size], i + size
        elif kind == 2:
            size, i = varint(i)
            value, i = data[i:i + size], i + size
        else:
            raise ValueError(f"not a SentencePiece model: protobuf wire type {kind}")
        yield key >> 3, value


# ---- the target folder ------------------------------------------------------------------------
def is_previous_export(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    if not names <= EXPORT_FILES or SAFETENSORS not in names or not (folder / SAFETENSORS).is_file():
        return False
    try:
        with safe_open(str(folder / SAFETENSORS), framework="pt") as st:
            return EXPORT_KEY in (st.metadata() or {})
    except (SafetensorError, OSError):
        return False


def check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: exists and is not a folder; refusing to replace it")
    if overwrite or not out_dir.exists() or not any(out_dir.iterdir()) or is_previous_export(out_dir):
        return
    raise FileExistsError(f"{out_dir}: not empty and not a previous gpt2mh export (holds "
                          f"{sorted(p.name for p in out_dir.iterdir())[:10]}); refusing to replace it. "
                          f"Pick another folder, or replace the whole folder with --overwrite (overwrite=True in Python)")
