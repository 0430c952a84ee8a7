"""The scores of a generated string against its reference: exact match and character accuracy
(1 - Levenshtein distance / reference length, floored at 0), the same for every head."""
from __future__ import annotations


def char_accuracy(pred: str, ref: str) -> float:
    return max(0.0, 1.0 - levenshtein(pred, ref) / max(len(ref), 1))


def exact_match(pred: str, ref: str) -> float:
    return float(pred == ref)


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a  # keep the DP row as short as the shorter string
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]
