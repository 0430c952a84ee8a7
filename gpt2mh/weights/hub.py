"""Where a model folder comes from: a local folder, a training output folder (its newest
`checkpoint-<step>`), or the HuggingFace hub through huggingface_hub. `resolve_model` is the one
resolver every entry point uses.

Downloads land in the standard HF cache, so a model already fetched by transformers is reused,
and HF_HUB_OFFLINE=1 is honoured."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..config import CONFIG_JSON

SAFETENSORS = "model.safetensors"  # the weights file gpt2mh writes and reads first

DEFAULT_REPO = "rinna/japanese-gpt2-small"
PREFIX = "checkpoint-"  # a training run's checkpoint folders: output_dir/checkpoint-<step>/
STATE_JSON = "trainer_state.json"  # written last into a checkpoint (gpt2mh.train.checkpoint)
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


# Only what gpt2mh reads; the .bin is fetched separately, and only when no safetensors exist.
ALLOW_PATTERNS = [
    CONFIG_JSON, SAFETENSORS, "model.safetensors.index.json", "model-*.safetensors",
    "spiece.model", "gpt2mh.json", "tokenizer_config.json", "special_tokens_map.json",
]


def looks_like_path(src: str) -> bool:
    return src.startswith((".", "/", "~")) or src.count("/") != 1 or "\\" in src


def resolve_model(src: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A model folder, a training output folder (-> its newest complete checkpoint) or a hub repo id
    (-> its cached snapshot): the folder to load."""
    folder = resolve_checkpoint(src, revision=revision, cache_dir=cache_dir)
    if not (folder / CONFIG_JSON).is_file():
        newest = latest_checkpoint(folder)
        if newest is not None:
            return newest
    return folder


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first. Temp folders (hidden names) never match."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        m = _NAME.match(path.name)
        if m and path.is_dir() and (path / STATE_JSON).is_file() and (path / SAFETENSORS).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(src: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local folder as it is, or a hub repo id -> the folder of its cached snapshot."""
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a folder path or a hub id such as {DEFAULT_REPO!r}, got {src!r}")
    if not str(src).strip():  # "" is not the current folder
        raise ValueError(f"checkpoint {src!r}: give a checkpoint folder or a hub id such as {DEFAULT_REPO!r}")
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path}: expected a checkpoint folder (config.json + weights), got a file")
        return path
    if isinstance(src, Path) or looks_like_path(str(src)):
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    return download(str(src), revision=revision, cache_dir=cache_dir)


def download(repo_id: str = DEFAULT_REPO, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Fetch the files gpt2mh needs into the HF cache (or find them there when offline)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS))
        if not any(folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").exists():
            # Older repos (rinna's among them) ship only pytorch_model.bin; gpt2mh converts it once.
            hf_hub_download(repo_id, "pytorch_model.bin", revision=revision, cache_dir=cache_dir)
    except HFValidationError as e:
        raise FileNotFoundError(f"{repo_id!r} is neither a local folder nor a valid hub repo id ({e})") from None
    except Exception as e:  # offline with nothing cached, unknown repo/revision, no network
        raise FileNotFoundError(
            f"could not get {repo_id!r}{f' at revision {revision!r}' if revision else ''} from the HuggingFace hub "
            f"or its local cache ({type(e).__name__}: {e}). Download it where a network exists with "
            f"`gpt2mh download {repo_id}` (or `huggingface-cli download {repo_id}`), which fills the HF cache "
            f"(HF_HOME); or pass the path of a local folder holding config.json and the weights."
        ) from None
    if not (folder / CONFIG_JSON).is_file():
        raise FileNotFoundError(f"{repo_id}: the snapshot at {folder} has no config.json")
    return folder
