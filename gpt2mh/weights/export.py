"""One head -> a plain transformers `GPT2LMHeadModel` folder (config, safetensors, rinna's tokenizer files).

The folder loads with `AutoModelForCausalLM.from_pretrained(out)` and, for gpt2mh's ids,
`AutoTokenizer.from_pretrained(out, use_fast=False)` with `do_lower_case = True` set after loading (as
rinna's model card says); and back into gpt2mh as a one-head ("lm") model. No tokenizer.json is written:
no fast tokenizer gives SentencePiece's ids (`FAST_TOKENIZER_GAP`).
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
TOKENIZER_JSON = "tokenizer.json"  # written by gpt2mh < issue 28: a previous export may hold one
# Why the export writes the slow tokenizer's files only. The `tokenizers` library's `Precompiled`
# normalizer (the one transformers' T5 converter uses for spiece.model's NFKC map) normalises per grapheme
# cluster, where SentencePiece matches the map's longest prefix: "か" + U+3099 (combining dakuten) and
# half-width "ｶﾞ" stay two pieces instead of "が" / "ガ", and a mapped character followed by a combining
# mark loses the mark. No other normaliser in `tokenizers` reproduces the map, so a fast tokenizer would
# give other ids than gpt2mh on such text (tests/weights/test_export.py searches for these).
FAST_TOKENIZER_GAP = ("transformers' fast tokenizer does not normalise Japanese as SentencePiece does "
                      "(combining dakuten, half-width kana): load the slow one")
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
    """spiece.model + the files that make transformers build rinna's slow T5Tokenizer (no tokenizer.json:
    see FAST_TOKENIZER_GAP).

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
