"""gpt2mh: one GPT-2 trunk, N output heads — multi-task fine-tuning and one-pass multi-head generation."""
from .config import GPT2Config

__all__ = ["GPT2Config", "MultiHeadGPT2", "Tokenizer"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use, so that `import gpt2mh.model` stays the network alone: MultiHeadGPT2
    # (the network with its HF-style methods) pulls in loading and generation, the tokenizer
    # pulls in sentencepiece.
    if name == "MultiHeadGPT2":
        from .api import MultiHeadGPT2

        return MultiHeadGPT2
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(name)
