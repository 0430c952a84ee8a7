"""A gpt2mh model folder: `load_model` / `save_model`, the head names in gpt2mh.json, HeadsWarning,
and the device / dtype arguments (checked before any file is read)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open

from ..atomic import atomic_save_file, atomic_write_text
from ..config import CONFIG_JSON, GPT2Config
from ..model import GPT2, check_head_names
from .hf import (
    PYTORCH_BIN,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    CheckpointError,
    check_finite,
    check_float,
    convert_hf_state_dict,
    read_state_dict,
    weight_files,
)

META = "gpt2mh.json"  # head names of a gpt2mh checkpoint; absent in a plain HF checkpoint
FORMAT_VERSION = 1


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
    heads, device, dtype = check_load_args(heads, device, dtype)
    folder = Path(folder)
    config = GPT2Config.from_json(folder / CONFIG_JSON)
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


def check_load_args(heads=None, device=None, dtype=None, *, revision=None, quantize=None, src=None):
    """Every argument of from_pretrained / load_model, checked and named before any file is read (a wrong
    kind of argument would otherwise surface as an error about the checkpoint). Returns (heads, device,
    dtype) in their checked forms."""
    if heads is not None:
        heads = check_head_names(heads)  # "lm" is one name; [], [""], duplicates and non-strings are named
    device, dtype = check_device(device), check_dtype(dtype)
    if revision is not None:
        if not isinstance(revision, str) or not revision.strip():
            raise ValueError(f"revision={revision!r} must be a branch, tag or commit hash of a hub repo (a "
                             f"non-empty str), or None")
        if src is not None and isinstance(src, (str, os.PathLike)) and Path(src).expanduser().is_dir():
            raise ValueError(f"revision={revision!r} pins a commit of a hub repo, but {src} is a local folder "
                             f"(it would be ignored); leave revision out")
    if quantize not in (None, False, "int8"):
        raise ValueError(f"quantize={quantize!r}: supported are 'int8' and None (fp32)")
    if quantize == "int8" and (device.type != "cpu" or dtype not in (None, torch.float32)):
        raise ValueError(f"quantize='int8' needs a CPU float32 model, but device={str(device)!r}, dtype={dtype}: "
                         f"int8 kernels are CPU-only here")
    return heads, device, dtype


def check_device(device) -> torch.device:
    """None: the CPU. A torch.device, a device string ('cpu', 'cuda:1') or a CUDA index (0 = 'cuda:0'),
    usable in this torch build; bools, floats, '' and the 'meta' device (no data) are refused by name."""
    if device is None:
        return torch.device("cpu")
    ok_kind = isinstance(device, (str, torch.device)) or isinstance(device, int) and not isinstance(device, bool)
    reason = "" if ok_kind else f"a {type(device).__name__} is not a device"
    if ok_kind:
        try:
            dev = torch.device(device)
            if dev.type == "meta":
                raise RuntimeError("the meta device holds no data")
            torch.empty(0, device=dev)
            return dev
        except (RuntimeError, AssertionError, TypeError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"device={device!r} is not usable here ({reason}); pass device='cpu' or a device "
                     f"this torch build has (torch.cuda.is_available() is {torch.cuda.is_available()})")


_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32",
                "fp64": "float64", "double": "float64"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the network computes in


def check_dtype(dtype) -> torch.dtype | None:
    """None (the checkpoint's dtype), one of DTYPES, its name ('float16', 'torch.bfloat16', 'fp16') or a
    numpy float dtype of the same name; anything else is refused by name."""
    if dtype is None:
        return None
    found = dtype
    if not isinstance(dtype, torch.dtype):
        name = dtype if isinstance(dtype, str) else None
        if type(dtype).__module__.startswith("numpy") or getattr(dtype, "__module__", "") == "numpy":
            try:
                import numpy as np

                name = np.dtype(dtype).name
            except TypeError:
                name = None
        if name is not None:
            name = name.removeprefix("torch.")
            found = getattr(torch, _DTYPE_NAMES.get(name, name), None)
    if isinstance(found, torch.dtype) and found in DTYPES:
        return found
    raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype gpt2mh computes in; pass one of "
                     f"torch.float32, torch.float16, torch.bfloat16, torch.float64 (or its name: 'float16', ...)")


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
    atomic_write_text(folder / CONFIG_JSON, json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    meta = {"format_version": FORMAT_VERSION, "head_names": list(model.head_names)}
    atomic_write_text(folder / META, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder
