"""HF GPT-2 checkpoint files -> our state dict: safetensors (sharded too), a .bin converted to safetensors once
(safely), the pure name map, and shape / dtype / finiteness checks that name the key."""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open

from ..atomic import atomic_save_file, refuse_same
from ..config import GPT2Config
from ..model import GPT2
from .hub import SAFETENSORS

SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
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
