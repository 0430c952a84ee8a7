"""Checkpoints on disk: HF GPT-2 state dicts -> ours (a pure rename), safetensors in and out.

Loading never runs code: safetensors first; a `pytorch_model.bin` is read once with
`torch.load(weights_only=True)` and kept as safetensors so later loads are memory-mapped."""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import GPT2Config
from .model import MultiHeadGPT2, check_head_names

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
    if (folder / SAFETENSORS_INDEX).is_file():
        index = folder / SAFETENSORS_INDEX
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {e!r}") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = sorted({safe_child(folder, s, index) for s in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing: {missing}")
        return files
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
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
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as st:
                for key in st.keys():
                    if key in sd:
                        raise CheckpointError(f"{f}: key {key!r} appears in more than one shard")
                    sd[key] = st.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return sd


def converted_bin_path(bin_path: Path) -> Path:
    """Where the safetensors copy of a `.bin` is kept: the gpt2mh cache, keyed by file identity."""
    st = bin_path.stat()
    key = hashlib.sha256(f"{bin_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("GPT2MH_CACHE", Path.home() / ".cache" / "gpt2mh"))
    return root / "converted" / key / SAFETENSORS


def convert_bin(bin_path: Path, out: Path | None = None) -> Path:
    """`pytorch_model.bin` -> safetensors, once. Pickle is read with weights_only=True: no code runs."""
    bin_path = Path(bin_path)
    out = Path(out) if out is not None else converted_bin_path(bin_path)
    if out.is_file():
        return out
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
    atomic_save_file({k: v.contiguous() for k, v in sd.items()}, out, metadata={"format": "pt"})
    return out


def unpickling_reason(e: Exception) -> str:
    # torch's weights_only error is a page of advice whose first option is to load with
    # weights_only=False, i.e. to run the file's code: keep only the line that says what was refused.
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    found = [line.split("error:", 1)[1].split(". ")[0].strip() for line in lines
             if line.startswith("WeightsUnpickler error:")]
    return (found or [line for line in lines if line] or [type(e).__name__])[0]


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
        model = MultiHeadGPT2(config)
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


def load_model(folder: Path, heads: Sequence[str] | None = None, device=None,
               dtype: torch.dtype | None = None) -> MultiHeadGPT2:
    """A HF GPT-2 folder or a gpt2mh checkpoint folder -> MultiHeadGPT2 (eval mode)."""
    folder = Path(folder)
    device = torch.device(device or "cpu")
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
    names = check_head_names(heads if heads is not None else (meta["head_names"] if meta else ("lm",)))
    dtype = dtype or trunk["transformer.wte.weight"].dtype
    if not dtype.is_floating_point:
        raise CheckpointError(f"{source}: weights of dtype {dtype} are not floating point")

    saved = list(meta["head_names"]) if meta else []
    if meta:
        want = (len(saved), config.n_embd, config.vocab_size)
        if saved_heads is None or tuple(saved_heads.shape) != want:
            got = None if saved_heads is None else tuple(saved_heads.shape)
            raise CheckpointError(f"{source}: {META} lists {len(saved)} heads, so 'heads' must have shape {want}; found {got}")
    with torch.device("meta"):
        model = MultiHeadGPT2(config, names)
    # Saved heads keep their weights; a new name is an untied copy of the pretrained LM head (the
    # tied wte of a HF checkpoint), transposed to the Conv1D layout [C, V].
    stacked = torch.empty(len(names), config.n_embd, config.vocab_size, dtype=dtype, device=device)
    for i, name in enumerate(names):
        stacked[i].copy_(saved_heads[saved.index(name)] if name in saved else lm_head.t())
    state = {k: v.to(dtype) for k, v in trunk.items()}
    state["heads"] = stacked
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def new_temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new hidden temp file beside `path`, for an atomic rename onto it.

    Not mkstemp: its 0600 mode would stick to the checkpoint files; 0o666 here honours the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"))
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path = Path(path)
    fd, tmp = new_temp_beside(path)
    mode = os.fstat(fd).st_mode & 0o777  # the umask's; safetensors writes a 0600 file of its own
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = new_temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(model: MultiHeadGPT2, folder: str | Path, tokenizer=None) -> Path:
    """A gpt2mh checkpoint folder: config.json, model.safetensors (trunk + heads), gpt2mh.json.

    Each file is written atomically (temp file, fsync, rename)."""
    folder = Path(folder)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_save_file(tensors, folder / SAFETENSORS, metadata={"format": "pt", "gpt2mh": str(FORMAT_VERSION)})
    atomic_write_text(folder / "config.json", json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    meta = {"format_version": FORMAT_VERSION, "head_names": list(model.head_names)}
    atomic_write_text(folder / META, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder
