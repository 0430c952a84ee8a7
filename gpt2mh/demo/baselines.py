"""Trivial answers: what each head must beat before it can be said to have learned anything.

For every head, a few answers that need no model — a constant (one of the training set's most
frequent targets), and for a tag sequence its most frequent tag repeated as many times as the input's
length suggests (the ratio fitted on the training set) — are scored on the same examples with the
same metrics as the model. The strongest of them (by char accuracy) is the head's trivial answer."""
from __future__ import annotations

from collections import Counter
from statistics import mean
from typing import Callable, Sequence

from ..train.data import Example
from ..train.metrics import char_accuracy, exact_match

CONSTANTS = 3  # the training set's most frequent targets tried as constant answers


def candidates(train: Sequence[Example], head: str, tags: bool = False) -> dict[str, Callable[[str], str]]:
    """{description: input -> answer} fitted on the training examples that have a target for `head`;
    tags: its targets are strings of one-character tags, one per word (the corpus's pos)."""
    targets = [ex.targets[head] for ex in train if head in ex.targets]
    out = {f"always {t}": (lambda _, t=t: t) for t, _ in Counter(targets).most_common(CONSTANTS)}
    if tags and targets:
        tag = Counter("".join(targets)).most_common(1)[0][0]
        ratio = sum(map(len, targets)) / max(1, sum(len(ex.input) for ex in train if head in ex.targets))
        out[f"{tag} x {ratio:.2f} x input chars"] = lambda text, tag=tag, r=ratio: tag * max(1, round(r * len(text)))
    return out


def score_answer(answer: Callable[[str], str], rows: Sequence[Example], head: str) -> dict[str, float]:
    """{"char_accuracy", "exact_match"}: mean over rows of `answer(input)` against the head's target."""
    outs = [answer(ex.input) for ex in rows]
    return {"char_accuracy": mean(char_accuracy(o, ex.targets[head]) for o, ex in zip(outs, rows)),
            "exact_match": mean(exact_match(o, ex.targets[head]) for o, ex in zip(outs, rows))}


def trivial_scores(test: Sequence[Example], train: Sequence[Example], heads: Sequence[str],
                   tag_heads: Sequence[str] = ("pos",)) -> dict[str, dict]:
    """{head: {"answer": description, "char_accuracy", "exact_match"}}: the strongest trivial answer of
    each head on the test examples (those with a target for that head); tag_heads: see candidates()."""
    result = {}
    for head in heads:
        rows = [ex for ex in test if head in ex.targets]
        scored = [{"answer": name, **score_answer(answer, rows, head)}
                  for name, answer in candidates(train, head, head in tag_heads).items()]
        if scored:
            result[head] = max(scored, key=lambda s: (s["char_accuracy"], s["exact_match"]))
    return result
