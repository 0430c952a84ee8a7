"""GPT2Config's special ids belong to its vocabulary; one tokenizer lookup for a model folder."""
import shutil

import pytest

from gpt2mh import GPT2Config
from gpt2mh.tokenizer import PACKAGED_MODEL, Tokenizer

SMALL = dict(n_positions=16, n_embd=8, n_layer=1, n_head=2)


def test_bos_eos_default_to_the_last_id():
    assert (GPT2Config().bos_token_id, GPT2Config().eos_token_id) == (50256, 50256)  # GPT-2's <|endoftext|>
    c = GPT2Config(vocab_size=101, **SMALL)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (100, 100, None)


@pytest.mark.parametrize("field,value", [("bos_token_id", 101), ("eos_token_id", 5000), ("pad_token_id", 101),
                                         ("pad_token_id", -1), ("bos_token_id", -3)])
def test_out_of_vocab_ids_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value} is not a token id of this vocabulary: .*vocab_size=101"):
        GPT2Config(vocab_size=101, **SMALL, **{field: value})


def test_a_hf_config_json_keeps_its_ids():
    # transformers writes bos/eos 50256 whatever vocab_size; such checkpoints load as transformers loads them
    c = GPT2Config.from_hf_dict(dict(vocab_size=101, bos_token_id=50256, eos_token_id=50256, **SMALL))
    assert (c.bos_token_id, c.eos_token_id) == (50256, 50256)
    assert GPT2Config.from_hf_dict(dict(vocab_size=101, **SMALL)).eos_token_id == 50256  # HF's default
    with pytest.raises(ValueError, match="pad_token_id=-1 is not a token id"):
        GPT2Config.from_hf_dict(dict(vocab_size=101, pad_token_id=-1, **SMALL))


def test_tokenizer_for_a_model_folder(tmp_path, rinna_spiece):
    assert Tokenizer.for_model(tmp_path).model_file == PACKAGED_MODEL
    shutil.copy(rinna_spiece, tmp_path / "spiece.model")
    assert Tokenizer.for_model(tmp_path).model_file == tmp_path / "spiece.model"
