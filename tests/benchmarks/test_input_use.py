"""benchmarks/experiments/input_use.py: the swap that tells whether a head reads its input, on hand-made outputs
(a head that copies its input loses its score when paired with another sentence; one that answers a
constant does not)."""

import pytest
from helpers import load_benchmark

from gpt2mh.train.data import Example


def load():
    return load_benchmark("experiments/input_use")


@pytest.mark.parametrize("lengths", [[5, 1, 3, 2, 4], [2, 2], [7, 1, 1, 9, 3, 3], [4, 4, 4]])
def test_neighbours_is_a_derangement_of_nearby_lengths(lengths):
    partner = load().neighbours(lengths)
    assert sorted(partner) == list(range(len(lengths)))  # a permutation: every output is used once
    assert all(p != i for i, p in enumerate(partner))
    rank = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    assert all(abs(rank.index(i) - rank.index(p)) <= 2 for i, p in enumerate(partner))


def test_neighbours_needs_two():
    with pytest.raises(ValueError, match="at least 2"):
        load().neighbours([3])


def test_a_copying_head_loses_its_score_a_constant_one_does_not():
    mod = load()
    inputs = ["あいう", "かきく", "さしす", "たちつ"]
    rows = [Example(x, {"copy": x, "const": "なし"}, "") for x in inputs]
    partner = mod.neighbours([len(x) for x in inputs])
    s = mod.scores({"copy": inputs, "const": ["なし"] * 4}, rows, partner)
    assert s["copy"]["own"] == 1.0 and s["copy"]["neighbour"] == 0.0 == s["copy"]["neighbour_ref"]
    assert s["const"]["own"] == s["const"]["neighbour"] == s["const"]["neighbour_ref"] == 1.0
    assert s["copy"]["own_exact"] == 1.0 and s["copy"]["neighbour_exact"] == 0.0


def test_copy_rate_counts_entity_texts_found_in_the_input():
    mod = load()
    assert mod.entity_texts("なし") == [] and mod.entity_texts("東京/loc 5日/dat") == ["東京", "5日"]
    rate = mod.copy_rate(["東京/loc 大阪/loc", "なし", "ｂｂｃ/org"], ["東京で会議。", "雨。", "bbcが報じた。"])
    assert rate == {"entities": 3, "in_input": 2 / 3}  # full-width ｂｂｃ normalises as the tokenizer does
    assert mod.copy_rate(["なし"], ["雨。"]) == {"entities": 0, "in_input": None}


@pytest.mark.slow
def test_the_script_on_the_quickstarts_model(tmp_path_factory, tmp_path):
    # End to end on the shared 3-step quickstart run (tests/helpers.py): every head scored both ways,
    # the entities counts, and the JSON written where --out says.
    import json

    from helpers import OUTPUT, ok, quickstart_run

    cwd, proc = quickstart_run(tmp_path_factory.getbasetemp())
    ok(proc)
    out = tmp_path / "input-use.json"
    result = load().main(["--model", str(cwd / OUTPUT), "--train-rows", "5", "--out", str(out)])
    assert set(result["scores"]) == {"tense", "entities", "pos"} and result["test_sentences"] == 50
    for s in result["scores"].values():
        assert all(0.0 <= s[k] <= 1.0 for k in ("own", "neighbour", "neighbour_ref", "own_exact", "neighbour_exact"))
    assert result["entities_copy"]["references_test"] == {"entities": 100, "in_input": 1.0}
    assert json.loads(out.read_text(encoding="utf-8"))["scores"] == result["scores"]
