"""Loading with an argument of the wrong kind (issue 28, class 4): every argument of
MultiHeadGPT2.from_pretrained and load_model is checked and named before any file is read. A table over
each argument's wrong kinds (not a float dtype, odd device forms, odd heads, revision, quantize): with
every file read replaced by a tripwire, each call must fail with an error naming the argument, never
reach a file, never blame the checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2mh import MultiHeadGPT2
from gpt2mh.weights import folder as folder_mod
from gpt2mh.weights.folder import check_dtype, load_model

BAD = {
    "dtype": [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn,
              "int8", "float17", "", "torch.int64", "complex64", int, float, np.int32, np.dtype("int16"),
              np.complex64, 32, 16.0, True, object(), ["float32"], torch.tensor(1.0)],
    "device": [True, False, 1.5, -1, "", " ", "gpu", "gpu0", "cuda:x", "meta", torch.device("meta"), b"cpu",
               ["cpu"], object(), "cpu,cuda", "cuda" if not torch.cuda.is_available() else "cuda:99",
               0 if not torch.cuda.is_available() else 99],
    "heads": [[], [""], ["a", "a"], [1], "", ["ok", None], 5, [" "]],
    "revision": [123, "", b"main", ["main"], "  "],
    "quantize": ["INT8", "int4", True, 8, "fp16", "float32"],
}
CASES = [(arg, value) for arg, values in BAD.items() for value in values]


class FileRead(AssertionError):
    pass


@pytest.fixture
def tripwire(monkeypatch):
    def read(*a, **k):
        raise FileRead("a file was read before the arguments were checked")

    import gpt2mh.api as api

    monkeypatch.setattr(api, "resolve_model", read)
    monkeypatch.setattr(folder_mod.GPT2Config, "from_json", read)
    monkeypatch.setattr(folder_mod, "read_state_dict", read)
    monkeypatch.setattr(folder_mod, "weight_files", read)


@pytest.mark.parametrize("arg,value", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_a_wrong_argument_is_named_before_any_file_is_read(tripwire, tmp_path, arg, value):
    name = "heads" if arg == "heads" else arg
    for call in (lambda: MultiHeadGPT2.from_pretrained(tmp_path, **{arg: value}),
                 lambda: load_model(tmp_path, **{arg: value}) if arg not in ("revision", "quantize") else None):
        try:
            call()
        except FileRead:
            pytest.fail(f"{arg}={value!r} reached a file")
        except (ValueError, TypeError) as e:
            msg = str(e)
            assert f"{name}=" in msg or "head names" in msg or "at least one head" in msg or "duplicate head" in msg, msg
            assert "checkpoint" not in msg.lower() or arg == "revision", msg
        else:
            if arg in ("revision", "quantize"):  # load_model takes neither
                continue
            pytest.fail(f"{arg}={value!r} accepted")


def test_a_revision_for_a_local_folder_is_refused(tripwire, tmp_path):
    with pytest.raises(ValueError, match=r"revision='main' pins a commit of a hub repo, but .* is a local folder"):
        MultiHeadGPT2.from_pretrained(tmp_path, revision="main")


@pytest.mark.parametrize("value,want", [
    (torch.float16, torch.float16), ("fp16", torch.float16), ("torch.bfloat16", torch.bfloat16),
    (np.float32, torch.float32), (np.dtype("float64"), torch.float64), ("double", torch.float64), (None, None)])
def test_float_dtypes_in_every_spelling(value, want):
    assert check_dtype(value) == want
