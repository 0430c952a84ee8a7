"""Checkpoints on disk: HF GPT-2 state dicts -> ours (a pure rename), safetensors in and out.

Loading never runs code: safetensors first; a `pytorch_model.bin` is read once with
`torch.load(weights_only=True)` and kept as safetensors so later loads are memory-mapped."""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open

from .atomic import atomic_save_file, atomic_write_text, refuse_same
from .config import GPT2Config
from .model import GPT2, check_head_names

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
META = "gpt2mh.json"  # head names of a gpt2mh checkpoint; absent in a plain HF checkpoint
FORMAT_VERSION = 1
LEGACY_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers old transformers saved


def is_legacy_buffer(key: str) -> bool:
    # "h.0.attn.bias" is a buffer; "h.0.attn.c_attn.bias" is a weight.
    return ".".join(key.split(".")[-2:]) in LEGACY_BUFFERS


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the keys involved."""


# ---- reading ----------------------------------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, converting a lone `.bin` once if needed."""
    folder = Path(folder)
    if (folder / SAFETENSORS).is_file():  # transformers' order too: the single file before an index
        return [folder / SAFETENSORS]
    if (folder / SAFETENSORS_INDEX).is_file():
        index = folder / SAFETENSORS_INDEX
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {e!r}") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        if not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' is empty (no tensor is mapped to a shard); "
                                  f"the index is broken or stale: delete it if {SAFETENSORS} holds the weights")
        files = sorted({safe_child(folder, s, index) for s in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing: {missing}")
        return files
    if (folder / PYTORCH_BIN).is_file():
        return [convert_bin(folder / PYTORCH_BIN)]
    raise FileNotFoundError(
        f"{folder}: no weights found (looked for {SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN})"
    )


def safe_child(folder: Path, name: str, source: Path) -> Path:
    # File names inside metadata must stay inside the checkpoint folder: no '..', no absolute paths,
    # no symlink pointing elsewhere.
    if not isinstance(name, str):
        raise CheckpointError(f"{source}: shard file name {name!r} is not a string")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{source}: refusing file name {name!r} (it leaves the checkpoint folder)")
    path = folder / name
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":  # HF cache: snapshots/<commit>/<file> -> ../../blobs/<hash>
        roots.append((folder.parent.parent / "blobs").resolve())
    if path.is_symlink() and not any(path.resolve().is_relative_to(r) for r in roots):
        raise CheckpointError(f"{source}: {name!r} is a symlink to {path.resolve()}, outside the checkpoint")
    return path


def read_state_dict(files: Sequence[Path], device="cpu") -> dict[str, torch.Tensor]:
    """Tensors straight from safetensors files (memory-mapped reads, one copy on `device`)."""
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        check_readable(f)
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as st:
                for key in st.keys():
                    if key in sd:
                        raise CheckpointError(f"{f}: key {key!r} appears in more than one shard")
                    sd[key] = st.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return sd


def check_readable(path: Path) -> None:
    # safetensors reports an unreadable file as "No such file": say what is wrong instead.
    try:
        open(path, "rb").close()
    except PermissionError:
        raise PermissionError(f"{path}: permission denied; this user cannot read the weights file "
                              f"(check its owner and mode, e.g. chmod a+r)") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a weights file") from None


def converted_bin_path(bin_path: Path) -> Path:
    """Where the safetensors copy of a `.bin` is kept: the gpt2mh cache, keyed by file identity."""
    st = bin_path.stat()
    key = hashlib.sha256(f"{bin_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("GPT2MH_CACHE", Path.home() / ".cache" / "gpt2mh"))
    return root / "converted" / key / SAFETENSORS


def convert_bin(bin_path: Path, out: Path | None = None, overwrite: bool = False) -> Path:
    """`pytorch_model.bin` -> safetensors, once (an existing `out` is kept unless overwrite=True).

    Pickle is read with weights_only=True: no code runs. `out` must not be the input itself."""
    bin_path = Path(bin_path)
    out = Path(out) if out is not None else converted_bin_path(bin_path)
    refuse_same(out, bin_path, what="convert output")
    if out.is_file() and not overwrite:
        return out
    check_readable(bin_path)
    try:
        # mmap needs the zip format (torch >= 1.6); 2019-era checkpoints use the legacy pickle format.
        sd = torch.load(bin_path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(bin_path))
    except Exception as e:  # weights_only refuses arbitrary objects; a torn file fails to unpickle
        raise CheckpointError(
            f"{bin_path}: cannot be read as a plain tensor checkpoint with torch.load(weights_only=True) "
            f"(it may hold code or be corrupt; gpt2mh never unpickles arbitrary objects): {unpickling_reason(e)}"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{bin_path}: expected a dict of tensors (a state dict)")
    sd = {k: v for k, v in sd.items() if not is_legacy_buffer(k)}
    wte = sd.get("transformer.wte.weight", sd.get("wte.weight"))
    lm = sd.get("lm_head.weight")
    if lm is not None and wte is not None and lm.data_ptr() == wte.data_ptr():
        del sd["lm_head.weight"]  # tied: safetensors stores no aliases; the loader re-ties it
    atomic_save_file({k: v.contiguous() for k, v in sd.items()}, out, metadata={"format": "pt"}, inputs=[bin_path])
    return out


def unpickling_reason(e: Exception) -> str:
    # torch's weights_only error is a page of advice whose first option is to load with
    # weights_only=False, i.e. to run the file's code: keep only the line that says what was refused.
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    # the reason follows "WeightsUnpickler error:" on its line, or (a torn or non-torch file) a blank line later
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:
        return found.group(1).split(". ")[0].strip()
    lines = [line.strip() for line in text.splitlines()]
    return ([line for line in lines if line] or [type(e).__name__])[0]


# ---- HF names -> ours -------------------------------------------------------------------------
def convert_hf_state_dict(sd: dict[str, torch.Tensor], config: GPT2Config, source: str = "checkpoint"):
    """HF GPT-2 state dict -> (our trunk state dict, lm_head [V, C]).

    Pure and strict: optional `transformer.` prefix, legacy buffers dropped, a missing lm_head tied
    to wte; any missing/unexpected key or wrong shape raises one error listing them all."""
    trunk, lm_head = {}, None
    for key, value in sd.items():
        if key == "lm_head.weight":
            lm_head = value
            continue
        name = key.removeprefix("transformer.")
        if is_legacy_buffer(name):
            continue
        trunk["transformer." + name] = value
    if lm_head is None:
        lm_head = trunk.get("transformer.wte.weight")
    check_shapes(trunk, expected_trunk_shapes(config), source)
    V, C = config.vocab_size, config.n_embd
    if lm_head is not None and tuple(lm_head.shape) != (V, C):
        raise CheckpointError(f"{source}: lm_head.weight has shape {tuple(lm_head.shape)}, config says ({V}, {C})")
    return trunk, lm_head


def expected_trunk_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = GPT2(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "heads"}


def check_shapes(sd: dict[str, torch.Tensor], expected: dict[str, tuple], source: str) -> None:
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs config {expected[k]}"
             for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    if wrong:
        problems.append(f"shape mismatches (does config.json match these weights?) {wrong[:20]}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def check_float(sd: dict[str, torch.Tensor], source: str) -> None:
    # A header may claim I32 for bytes that are F32 (same size): loading would silently cast garbage.
    bad = [f"{k} ({v.dtype})" for k, v in sd.items() if v is not None and not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"{source}: weights must be floating point; found {bad[:10]}")


def check_finite(sd: dict[str, torch.Tensor], source: str) -> None:
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: weights hold NaN or inf in {bad[:10]}; refusing to load a broken checkpoint")


# ---- whole models -----------------------------------------------------------------------------
def read_meta(folder: Path) -> dict | None:
    path = Path(folder) / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("head_names"), list):
            raise ValueError('expected {"head_names": [name, ...]}')
        check_head_names(meta["head_names"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid gpt2mh head list: {e}") from None
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is newer than this gpt2mh reads "
                              f"({FORMAT_VERSION}); upgrade gpt2mh")
    return meta


class HeadsWarning(UserWarning):
    """Loading changed a checkpoint's heads: a trained head left out, or an untrained one added."""


def load_model(folder: Path, heads: Sequence[str] | None = None, device=None,
               dtype: torch.dtype | str | None = None, *, cls: type[GPT2] = GPT2) -> GPT2:
    """A HF GPT-2 folder or a gpt2mh checkpoint folder -> a `cls` model (eval mode).

    cls: the network `GPT2`, or a subclass (`gpt2mh.MultiHeadGPT2.from_pretrained` passes itself)."""
    folder = Path(folder)
    device = check_device(device)
    dtype = check_dtype(dtype)
    config = GPT2Config.from_json(folder / "config.json")
    meta = read_meta(folder)
    files = weight_files(folder)
    source = str(files[0] if len(files) == 1 else folder)
    if not files[0].is_relative_to(folder):  # a .bin converted into the cache: name the user's file
        source = f"{folder / PYTORCH_BIN} (converted to {files[0]})"
    sd = read_state_dict(files, device)
    check_finite(sd, source)
    saved_heads = sd.pop("heads", None)
    trunk, lm_head = convert_hf_state_dict(sd, config, source)
    check_float({**trunk, "lm_head.weight": lm_head, "heads": saved_heads}, source)
    saved = saved_head_names(folder, meta, saved_heads, files, heads, source)
    names = check_head_names(heads if heads is not None else (saved or ("lm",)))
    dtype = dtype or trunk["transformer.wte.weight"].dtype
    if not dtype.is_floating_point:
        raise CheckpointError(f"{source}: weights of dtype {dtype} are not floating point")

    if saved:
        want = (len(saved), config.n_embd, config.vocab_size)
        if saved_heads is None or tuple(saved_heads.shape) != want:
            got = None if saved_heads is None else tuple(saved_heads.shape)
            raise CheckpointError(f"{source}: {META} lists {len(saved)} heads, so 'heads' must have shape {want}; found {got}")
        warn_heads_changed(folder, saved, names)
    with torch.device("meta"):
        model = cls(config, names)
    # Saved heads keep their weights; a new name is an untied copy of the pretrained LM head (the
    # tied wte of a HF checkpoint), transposed to the Conv1D layout [C, V].
    stacked = torch.empty(len(names), config.n_embd, config.vocab_size, dtype=dtype, device=device)
    for i, name in enumerate(names):
        stacked[i].copy_(saved_heads[saved.index(name)] if name in saved else lm_head.t())
    state = {k: v.to(dtype) for k, v in trunk.items()}
    state["heads"] = stacked
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def saved_head_names(folder: Path, meta, saved_heads, files, heads, source: str) -> list[str]:
    """The names of the heads stored in the weights: gpt2mh.json's, else model.safetensors' own copy.

    Without either, stored (fine-tuned) heads are never replaced by a fresh copy of wte in silence."""
    if meta:
        return list(meta["head_names"])
    if saved_heads is None:
        return []
    n = saved_heads.size(0) if saved_heads.dim() == 3 else None
    stored = stored_head_names(files[0])
    if stored is not None and len(stored) == n:
        warnings.warn(f"{folder}: no {META}; the {n} head names were recovered from {files[0].name}: {stored}",
                      HeadsWarning, stacklevel=4)
        return stored
    if heads is not None and not isinstance(heads, str) and len(heads) == n:
        warnings.warn(f"{folder}: no {META}; naming the {n} stored heads {list(heads)} in their saved order "
                      f"(as given by heads=)", HeadsWarning, stacklevel=4)
        return list(heads)
    raise CheckpointError(
        f"{source}: holds {n} fine-tuned head(s) ('heads' {tuple(saved_heads.shape)}) but {folder / META}, which "
        f"names them, is missing: copy {META} from the original checkpoint, or pass heads=[{n} names] in their "
        f"saved order")


def stored_head_names(path: Path) -> list[str] | None:
    try:
        with safe_open(str(path), framework="pt") as st:
            names = json.loads((st.metadata() or {}).get("head_names", "null"))
    except (SafetensorError, OSError, ValueError):
        return None
    return names if isinstance(names, list) and all(isinstance(x, str) for x in names) else None


def warn_heads_changed(folder: Path, saved: list[str], names: Sequence[str]) -> None:
    dropped = [h for h in saved if h not in names]
    added = [h for h in names if h not in saved]
    if dropped:
        warnings.warn(f"{folder}: trained head(s) {dropped} are not in heads={list(names)} and are left out of "
                      f"the loaded model (heads=None keeps all of {saved})", HeadsWarning, stacklevel=4)
    if added:
        warnings.warn(f"{folder}: head(s) {added} are not in the checkpoint (its heads: {saved}); they start "
                      f"untrained, as copies of the pretrained LM head", HeadsWarning, stacklevel=4)


def check_device(device) -> torch.device:
    try:
        device = torch.device(device or "cpu")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"device={device!r} is not usable here ({reason}); pass device='cpu' or a device "
                         f"this torch build has (torch.cuda.is_available() is {torch.cuda.is_available()})") from None
    return device


_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}


def check_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        found = getattr(torch, _DTYPE_NAMES.get(name, name), None)
        if isinstance(found, torch.dtype) and found.is_floating_point:
            return found
    raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; pass e.g. torch.float16 or "
                     f"'float16', 'bfloat16', 'float32'")


def save_model(model: GPT2, folder: str | Path, tokenizer=None) -> Path:
    """A gpt2mh checkpoint folder: config.json, model.safetensors (trunk + heads), gpt2mh.json.

    Each file is written atomically (temp file, fsync, rename)."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"save_pretrained: folder must be a folder path, got {folder!r}")
    if not str(folder).strip():  # "" would be the current folder
        raise ValueError(f"save_pretrained: folder must be a folder path, got {folder!r}")
    folder = Path(folder)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # The head names also go into the weights file, so a copy without gpt2mh.json still knows them.
    atomic_save_file(tensors, folder / SAFETENSORS, metadata={
        "format": "pt", "gpt2mh": str(FORMAT_VERSION), "head_names": json.dumps(list(model.head_names))})
    stale = folder / SAFETENSORS_INDEX  # an index left from a sharded save would describe other weights
    if stale.is_file():
        stale.unlink()
    atomic_write_text(folder / "config.json", json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    meta = {"format_version": FORMAT_VERSION, "head_names": list(model.head_names)}
    atomic_write_text(folder / META, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder
