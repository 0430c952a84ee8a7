"""Training checkpoints: one folder `output_dir/checkpoint-<step>/`, written atomically.

    config.json, model.safetensors, gpt2mh.json   the model (save_model: trunk + heads + head names);
                                                   MultiHeadGPT2.from_pretrained(folder) loads it
    spiece.model                                   the tokenizer
    training_state.pt                              optimizer, scheduler, torch RNG states (tensors only,
                                                   read back with torch.load(weights_only=True))
    trainer_state.json                             step, data position, best metric, python/numpy RNG
    train_config.json                              the TrainConfig of the run

Everything is written into a hidden temp folder in output_dir, fsynced, then renamed into place, so a
run killed at any moment leaves every `checkpoint-<step>` folder complete; only then are old ones pruned.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_torch_save, atomic_write_text, fsync_path, replace_dir
from ..weights.folder import save_model
from ..weights.hub import PREFIX, STATE_JSON, list_checkpoints

STATE_PT = "training_state.pt"
CONFIG_JSON = "train_config.json"
_TEMP_GLOB = f".{PREFIX}*.tmp"


def remove_stale_temp(output_dir) -> None:
    """Temp folders left by a run killed while writing a checkpoint."""
    for path in Path(output_dir).glob(_TEMP_GLOB):
        shutil.rmtree(path, ignore_errors=True)


# ---- RNG states ---------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states: torch ones as tensors, python/numpy ones as JSON-able lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- writing ------------------------------------------------------------------------------------
def save_checkpoint(output_dir, step: int, model, tokenizer, optimizer, scheduler, trainer_state: dict,
                    train_config: dict, rng: list[dict]) -> Path:
    """Write checkpoint-<step> atomically (an existing one of that step is replaced) and return it.

    rng: one rng_state() per process (rank order), so a data-parallel run resumes exactly too."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # os.mkdir honours the umask (mkdtemp would leave the checkpoint 0700)
    try:
        save_model(model, tmp, tokenizer)
        tensors = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": [r["torch"] for r in rng],
            "cuda_rng": [r["cuda"] for r in rng],
        }
        atomic_torch_save(tensors, tmp / STATE_PT)
        state = dict(trainer_state, python_rng=[r["python"] for r in rng], numpy_rng=[r["numpy"] for r in rng])
        atomic_write_text(tmp / STATE_JSON, json.dumps(state, indent=1) + "\n")
        atomic_write_text(tmp / CONFIG_JSON, json.dumps(train_config, indent=2, ensure_ascii=False) + "\n")
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        replace_dir(tmp, final)
        fsync_path(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(output_dir, keep_last: int | None, protect: set[int] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and those whose step is in `protect`."""
    if not keep_last:
        return []
    found = list_checkpoints(output_dir)
    removed = []
    for step, path in found[:-keep_last]:
        if step in protect:
            continue
        # Renamed first, so a half-deleted folder never looks like a complete checkpoint.
        doomed = path.with_name(f".{PREFIX}{step}.del.{secrets.token_hex(4)}.tmp")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    return removed


# ---- reading ------------------------------------------------------------------------------------
def load_training_state(folder) -> tuple[dict, dict]:
    """(trainer_state.json as a dict, training_state.pt tensors) of a checkpoint folder."""
    folder = Path(folder)
    for name in (STATE_JSON, STATE_PT):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: not a training checkpoint (no {name}); "
                                    f"to start from these weights use base={str(folder)!r} instead of resume")
    path = folder / STATE_JSON
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt trainer state ({e}); resume from an earlier checkpoint "
                         f"(resume='{folder.parent / (PREFIX + '<step>')}') or delete this one") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path}: not a trainer state (needs an integer 'step'); resume from another checkpoint")
    path = folder / STATE_PT
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn zip, or a pickle weights_only refuses
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: cannot be read (truncated or corrupt? {reason}); resume from an earlier "
                         f"checkpoint (resume='{folder.parent / (PREFIX + '<step>')}') or delete this one") from None
    missing = [k for k in ("optimizer", "scheduler", "torch_rng", "cuda_rng") if not isinstance(tensors, dict) or k not in tensors]
    if missing:
        raise ValueError(f"{path}: not a gpt2mh training state (missing {missing})")
    return state, tensors


def rank_rng(state: dict, tensors: dict, rank: int) -> dict | None:
    """The saved RNG states of process `rank`, or None when the run had fewer processes."""
    if rank >= len(tensors["torch_rng"]):
        return None
    return {"torch": tensors["torch_rng"][rank], "cuda": tensors["cuda_rng"][rank],
            "python": state["python_rng"][rank], "numpy": state["numpy_rng"][rank]}
