"""Where a checkpoint comes from: a local folder, or the HuggingFace hub through huggingface_hub.

Downloads land in the standard HF cache, so a model already fetched by transformers is reused,
and HF_HUB_OFFLINE=1 is honoured."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_REPO = "rinna/japanese-gpt2-small"
# Only what gpt2mh reads; the .bin is fetched separately, and only when no safetensors exist.
ALLOW_PATTERNS = [
    "config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
    "spiece.model", "gpt2mh.json", "tokenizer_config.json", "special_tokens_map.json",
]


def looks_like_path(src: str) -> bool:
    return src.startswith((".", "/", "~")) or src.count("/") != 1 or "\\" in src


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
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{repo_id}: the snapshot at {folder} has no config.json")
    return folder
