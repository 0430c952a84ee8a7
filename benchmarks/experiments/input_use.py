"""Does each head of a trained quickstart model read its input? The measurement behind "why" a head
does not beat its trivial answer by more.

On the 50 test sentences, every head's greedy outputs (what `gpt2mh eval` scores) are scored twice
against the sentence's own references: as generated from the sentence itself (`own`), and as
generated from the test sentence nearest to it in length (`neighbour`: the same outputs, paired with
the wrong sentence; a head that reads only the input's length scores about the same on both). The
ceiling beside them, `neighbour ref`, is what the same swap does to a perfect model (the neighbour's
reference scored against the sentence's own). For `entities` it also counts how many of the entity
texts the head writes occur in its input, on test and on training sentences (a head that copies
spans out of its input is near 100% on both; one that recalls training answers is not on test).

    python benchmarks/experiments/input_use.py                                # runs/quickstart, newest checkpoint
    python benchmarks/experiments/input_use.py --model DIR --out benchmarks/results/input-use-cpu.json

Writes JSON (benchmarks/results/ by default) and prints a table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402  (the harness in benchmarks/)


def neighbours(lengths: list[int]) -> list[int]:
    """partner[i] != i for every i, a test sentence of nearly the same length: sorted by length,
    adjacent pairs swap (an odd one out joins the last pair in a 3-cycle)."""
    if len(lengths) < 2:
        raise ValueError("need at least 2 sentences to pair")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    partner = [0] * len(lengths)
    for k in range(0, len(order) - 1, 2):
        a, b = order[k], order[k + 1]
        partner[a], partner[b] = b, a
    if len(order) % 2:  # a, b, c: a <- b <- c <- a
        a, b, c = order[-3:]
        partner[a], partner[b], partner[c] = b, c, a
    return partner


def entity_texts(output: str) -> list[str]:
    """The entity texts of an `entities` output (`text/type ...`, or なし)."""
    from gpt2mh.demo.corpus import NO_ENTITIES

    return [] if output.strip() == NO_ENTITIES else [w.rpartition("/")[0] or w for w in output.split()]


def copy_rate(outputs: list[str], inputs: list[str]) -> dict:
    """{"entities": how many entity texts were written, "in_input": the share found in the input}."""
    from gpt2mh.demo.corpus import producible

    found = [producible(text) in producible(src) for out, src in zip(outputs, inputs) for text in entity_texts(out)]
    return {"entities": len(found), "in_input": mean(found) if found else None}


def scores(predictions: dict[str, list[str]], examples, partner: list[int]) -> dict:
    from gpt2mh.train.metrics import char_accuracy, exact_match

    out = {}
    for h, preds in predictions.items():
        refs = [ex.targets[h] for ex in examples]
        out[h] = {
            "own": mean(char_accuracy(p, r) for p, r in zip(preds, refs)),
            "neighbour": mean(char_accuracy(preds[partner[i]], r) for i, r in enumerate(refs)),
            "neighbour_ref": mean(char_accuracy(refs[partner[i]], r) for i, r in enumerate(refs)),
            "own_exact": mean(exact_match(p, r) for p, r in zip(preds, refs)),
            "neighbour_exact": mean(exact_match(preds[partner[i]], r) for i, r in enumerate(refs)),
        }
    return out


def main(argv=None) -> dict:
    from gpt2mh import MultiHeadGPT2
    from gpt2mh.cli.args import model_folder
    from gpt2mh.demo.corpus import build_examples
    from gpt2mh.tokenizer import Tokenizer
    from gpt2mh.train.evaluate import generate_predictions, run_settings
    from gpt2mh.train.metrics import char_accuracy

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint or training output folder (default: runs/quickstart)")
    p.add_argument("--train-rows", type=int, default=50, help="training sentences for the entities copy rate")
    p.add_argument("--out", default=str(common.RESULTS / "input-use-cpu.json"))
    args = p.parse_args(argv)

    folder = model_folder(args.model)
    model = MultiHeadGPT2.from_pretrained(folder)
    tok = Tokenizer.from_pretrained(folder)
    heads = list(model.head_names)
    limits = run_settings(folder)["eval_max_new_tokens"]
    test = [ex for ex in build_examples("test") if all(h in ex.targets for h in heads)]
    train = build_examples("train")[:args.train_rows]
    common.log(f"{folder}: greedy outputs of heads {heads} on {len(test)} test and {len(train)} training sentences")
    predictions = generate_predictions(model, tok, test, heads, limits, progress=False)
    partner = neighbours([len(ex.input) for ex in test])
    result = {"model": str(folder), "test_sentences": len(test), "scores": scores(predictions, test, partner)}
    if "entities" in heads:
        on_train = generate_predictions(model, tok, train, ["entities"], limits, progress=False)["entities"]
        result["entities_copy"] = {
            "test": copy_rate(predictions["entities"], [ex.input for ex in test]),
            "train": copy_rate(on_train, [ex.input for ex in train]),
            "references_test": copy_rate([ex.targets["entities"] for ex in test], [ex.input for ex in test]),
        }
        result["entities_train_char_accuracy"] = mean(char_accuracy(o, ex.targets["entities"])
                                                      for o, ex in zip(on_train, train))
    result["machine"] = common.machine_info(common.torch.device("cpu"))
    common.write_json(args.out, result)

    print(f"char accuracy on {len(test)} test sentences, outputs generated from the sentence itself (own) or from "
          f"the test sentence nearest in length (neighbour); neighbour ref: the same swap for a perfect model")
    print(f"  {'head':<9} {'own':>7} {'neighbour':>10} {'neighbour ref':>14} {'exact own':>10} {'exact neighbour':>16}")
    for h, s in result["scores"].items():
        print(f"  {h:<9} {s['own']:7.3f} {s['neighbour']:10.3f} {s['neighbour_ref']:14.3f} {s['own_exact']:10.3f} "
              f"{s['neighbour_exact']:16.3f}")
    for where, c in result.get("entities_copy", {}).items():
        rate = "-" if c["in_input"] is None else f"{c['in_input']:.0%}"
        print(f"  entities written ({where}): {c['entities']}, found in the input: {rate}")
    if "entities_train_char_accuracy" in result:
        print(f"  entities char accuracy on the {len(train)} training sentences: {result['entities_train_char_accuracy']:.3f}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
