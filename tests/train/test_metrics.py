"""The per-head scores (gpt2mh.train.metrics), moved out of gpt2mh.demo.corpus: exact match and character accuracy."""
import pytest

from gpt2mh.train.metrics import char_accuracy, exact_match, levenshtein


@pytest.mark.parametrize("pred,ref,acc", [
    ("", "", 1.0), ("abc", "abc", 1.0), ("", "abcd", 0.0), ("abcd", "", 0.0),
    ("abxd", "abcd", 0.75), ("abd", "abcd", 0.75), ("xabcd", "abcd", 0.75),
    ("wxyz" * 5, "abcd", 0.0), ("カタカナ", "カタカナ", 1.0), ("カタカ", "カタカナ", 0.75),
])
def test_char_accuracy(pred, ref, acc):
    assert char_accuracy(pred, ref) == pytest.approx(acc)


def test_levenshtein_symmetry_and_exact_match():
    assert levenshtein("kitten", "sitting") == levenshtein("sitting", "kitten") == 3
    assert exact_match("ア", "ア") == 1.0 and exact_match("ア", "ア ") == 0.0
