"""GPT-2 architecture settings, read from a HuggingFace `config.json`."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ._checks import as_float, as_int

CONFIG_JSON = "config.json"  # the HF file GPT2Config reads and writes; a folder holding it is a model folder

# HF settings that change the maths and that this implementation does not do: refused by name.
_UNSUPPORTED = {
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "scale_attn_weights": True,
}


_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the same tanh approximation


def _get(d: dict, key: str, default):
    return default if d.get(key) is None else d[key]  # `null` in config.json means "not set"


def _int(key: str, value) -> int:
    # A file may write 768.0 or "768"; 1.5, True and "x" are refused.
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value)
    return as_int(key, value, whole_floats=True)


_INT_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_FLOAT_FIELDS = ("layer_norm_epsilon", "embd_pdrop", "attn_pdrop", "resid_pdrop")


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd (HF's rule: GPT2MLP uses n_inner or 4 * n_embd)
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: int | None = None  # None: vocab_size - 1 (GPT-2's <|endoftext|> is its last id, 50256)
    eos_token_id: int | None = None  # None: vocab_size - 1
    pad_token_id: int | None = None  # None: no pad id (generation pads with eos)
    embd_pdrop: float = 0.1  # dropout, active in training mode only
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1

    def __post_init__(self):
        if self.n_inner is None:  # the one place the MLP width is decided, as transformers decides it
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        # GPT2Config(**dict) from JSON/TOML: 1.0 for an int is fine, 1.5 / True / "x" / None are not.
        for name in _INT_FIELDS:
            object.__setattr__(self, name, _int(name, getattr(self, name)))
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.vocab_size - 1)
        self._check_special_ids(self.vocab_size)
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, as_float(name, getattr(self, name)))
        if not isinstance(self.activation_function, str):
            raise ValueError(f"activation_function={self.activation_function!r} must be a string")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"activation_function={self.activation_function!r} is not supported; "
                f"gpt2mh implements {', '.join(_ACTIVATIONS)} (GPT-2's tanh GELU)"
            )
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= getattr(self, name) <= 1.0:  # `not` also catches NaN
                raise ValueError(f"{name}={getattr(self, name)} is a dropout probability: it must be in [0, 1]")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"layer_norm_epsilon={self.layer_norm_epsilon} must be > 0")

    def _check_special_ids(self, limit: int | None) -> None:
        for name in _SPECIAL_IDS:
            value = getattr(self, name)
            if value is None:
                continue
            value = _int(name, value)
            object.__setattr__(self, name, value)
            if value < 0 or (limit is not None and value >= limit):
                raise ValueError(f"{name}={value} is not a token id of this vocabulary: special ids must be in "
                                 f"[0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "GPT2Config":
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{source}: model_type={d.get('model_type')!r}; gpt2mh loads GPT-2 checkpoints only")
        for key, supported in _UNSUPPORTED.items():
            if key in d and bool(d[key]) != supported:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by gpt2mh (only {supported})")
        try:
            n_embd = _int("n_embd", d["n_embd"])
            config = cls(
                vocab_size=_int("vocab_size", d["vocab_size"]),
                n_positions=_int("n_positions", d["n_positions"]),
                n_embd=n_embd,
                n_layer=_int("n_layer", d["n_layer"]),
                n_head=_int("n_head", d["n_head"]),
                n_inner=None if d.get("n_inner") is None else _int("n_inner", d["n_inner"]),
                layer_norm_epsilon=as_float("layer_norm_epsilon", _get(d, "layer_norm_epsilon", 1e-5)),
                activation_function=_get(d, "activation_function", "gelu_new"),
                embd_pdrop=as_float("embd_pdrop", _get(d, "embd_pdrop", 0.1)),
                attn_pdrop=as_float("attn_pdrop", _get(d, "attn_pdrop", 0.1)),
                resid_pdrop=as_float("resid_pdrop", _get(d, "resid_pdrop", 0.1)),
            )
            # transformers accepts special ids outside the vocabulary (a model that never emits them;
            # its GPT2Config defaults bos/eos to 50256 whatever vocab_size), so a config.json may hold
            # them: kept as written (ids >= 0); generation refuses them where they would be used.
            # HF's defaults for a missing key, not vocab_size - 1: what transformers itself would load.
            for name, default in (("bos_token_id", 50256), ("eos_token_id", 50256), ("pad_token_id", None)):
                object.__setattr__(config, name, _get(d, name, default))
            config._check_special_ids(None)
            return config
        except KeyError as e:
            raise ValueError(f"{source}: required setting {e.args[0]!r} is missing") from None
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "GPT2Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json; a checkpoint folder needs one") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        """A `config.json` that transformers' GPT2LMHeadModel loads."""
        d = asdict(self)
        d.update(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            n_ctx=self.n_positions,
            tie_word_embeddings=False,
        )
        return d
