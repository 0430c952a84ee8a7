"""gpt2mh: one GPT-2 trunk, N output heads — multi-task fine-tuning and one-pass multi-head generation."""
from .config import GPT2Config
from .model import MultiHeadGPT2

__all__ = ["GPT2Config", "MultiHeadGPT2", "Tokenizer"]
__version__ = "0.1.0"


def __getattr__(name):
    # The tokenizer pulls in sentencepiece: import it on first use.
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(name)
