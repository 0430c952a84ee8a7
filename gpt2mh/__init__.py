"""gpt2mh: one GPT-2 trunk, N output heads — multi-task fine-tuning and one-pass multi-head generation."""
from .config import GPT2Config

__version__ = "0.1.0"

# The public names, each imported on first use, so that `import gpt2mh.model` stays the network
# alone (MultiHeadGPT2 pulls in loading and generation, the tokenizer pulls in sentencepiece).
_LAZY = {
    "MultiHeadGPT2": "api",
    "Tokenizer": "tokenizer",
    "SamplingConfig": "inference.controls",
    "generate": "inference.generate",
    "generate_text": "inference.generate",
    "generate_rows": "inference.generate",
    "stream": "inference.generate",
    "score": "inference.score",
    "score_text": "inference.score",
    "TrainConfig": "train.config",
}
__all__ = ["GPT2Config", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
