"""Multi-task fine-tuning: the options of TrainConfig, and a real from-scratch run on hironsancorpus."""
from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
from helpers import (
    HEADS,
    TINY_MODEL,
    records,
    short_examples,
    tiny_config,
    tokenizer,
    write_data,
)

from gpt2mh import MultiHeadGPT2
from gpt2mh.weights.hub import latest_checkpoint
from gpt2mh.train.config import TrainConfig
from gpt2mh.train.data import DataError, write_jsonl
from gpt2mh.train.evaluate import evaluate, generate_predictions
from gpt2mh.train.loop import TrainingDiverged, train
from gpt2mh.train.metrics import char_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def base_checkpoint(folder, heads=HEADS, seed=0):
    """A small gpt2mh checkpoint (with the rinna tokenizer) to fine-tune."""
    from gpt2mh.config import GPT2Config

    tok = tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                        pad_token_id=tok.pad_id, **TINY_MODEL)
    return MultiHeadGPT2(config, heads).save_pretrained(folder, tokenizer=tok)


def trunk(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k != "heads"}


# ---- the loop ----------------------------------------------------------------------------------
def test_loss_goes_down(tmp_path):
    result = train(tiny_config(tmp_path, max_steps=12, batch_size=4, learning_rate=2e-2, warmup_steps=2))
    assert result.steps == 12 and len(result.losses) == 12
    assert sum(result.losses[-3:]) / 3 < 0.8 * result.losses[0], result.losses
    logged = records(tmp_path / "run")
    assert [r["step"] for r in logged] == list(range(1, 13))
    assert all(set(f"{h}/loss" for h in HEADS) <= set(r) for r in logged)
    for r in logged:  # the objective is the weighted sum of the per-head means
        assert r["loss"] == pytest.approx(sum(r[f"{h}/loss"] for h in HEADS), rel=1e-5)


def test_freeze_trunk_changes_heads_only(tmp_path):
    base = base_checkpoint(tmp_path / "base")
    before = MultiHeadGPT2.from_pretrained(base)
    result = train(tiny_config(tmp_path, base=str(base), model_config=None, freeze_trunk=True, weight_decay=0.1))
    after = MultiHeadGPT2.from_pretrained(result.last_checkpoint)
    for k, v in trunk(before).items():
        assert torch.equal(v, after.state_dict()[k]), k
    assert not torch.equal(before.heads, after.heads)


def test_freeze_embeddings(tmp_path):
    base = base_checkpoint(tmp_path / "base")
    before = MultiHeadGPT2.from_pretrained(base)
    result = train(tiny_config(tmp_path, base=str(base), model_config=None, freeze_embeddings=True, weight_decay=0.1))
    after = MultiHeadGPT2.from_pretrained(result.last_checkpoint)
    t = after.transformer
    assert torch.equal(t.wte.weight, before.transformer.wte.weight)
    assert torch.equal(t.wpe.weight, before.transformer.wpe.weight)
    assert not torch.equal(t.h[0].attn.c_attn.weight, before.transformer.h[0].attn.c_attn.weight)


def test_train_heads_trains_only_those(tmp_path):
    base = base_checkpoint(tmp_path / "base")
    before = MultiHeadGPT2.from_pretrained(base)
    # weight decay on: the frozen heads share one tensor with the trained one and must not decay
    result = train(tiny_config(tmp_path, base=str(base), model_config=None, train_heads=["reading"],
                               weight_decay=0.1))
    after = MultiHeadGPT2.from_pretrained(result.last_checkpoint)
    r, e, p = (after.head_names.index(h) for h in ("reading", "entities", "pos"))
    assert not torch.equal(after.heads[r], before.heads[r])
    assert torch.equal(after.heads[e], before.heads[e]) and torch.equal(after.heads[p], before.heads[p])
    assert not torch.equal(after.transformer.ln_f.weight, before.transformer.ln_f.weight)  # trunk trains
    assert set(records(tmp_path / "run")[0]) >= {"reading/loss"}
    assert "pos/loss" not in records(tmp_path / "run")[0]


def test_loss_weights(tmp_path):
    base = base_checkpoint(tmp_path / "base")
    before = MultiHeadGPT2.from_pretrained(base)
    weights = {"reading": 2.0, "entities": 0.5, "pos": 0.0}
    result = train(tiny_config(tmp_path, base=str(base), model_config=None, loss_weights=weights))
    for r in records(tmp_path / "run"):
        assert r["loss"] == pytest.approx(sum(w * r[f"{h}/loss"] for h, w in weights.items()), rel=1e-5)
    after = MultiHeadGPT2.from_pretrained(result.last_checkpoint)
    p = after.head_names.index("pos")
    assert torch.equal(after.heads[p], before.heads[p])  # weight 0: no gradient (and no decay here)
    with pytest.raises(ValueError, match="weight 0"):
        train(tiny_config(tmp_path, output_dir=str(tmp_path / "zero"), loss_weights={h: 0.0 for h in HEADS}))


def test_rows_without_a_head_give_no_loss_for_it(tmp_path):
    base = base_checkpoint(tmp_path / "base")
    before = MultiHeadGPT2.from_pretrained(base)
    data = write_data(tmp_path, drop_heads=("pos",), name="partial.jsonl")
    # issue 11: a trained head whose column is blank in every row is refused (it used to train silently)
    with pytest.raises(DataError, match=r"head\(s\) \['pos'\] .* is empty in every row"):
        train(tiny_config(tmp_path, train_file=data, base=str(base), model_config=None))
    result = train(tiny_config(tmp_path, train_file=data, base=str(base), model_config=None,
                               train_heads=["reading", "entities"]))
    after = MultiHeadGPT2.from_pretrained(result.last_checkpoint)
    p, r = after.head_names.index("pos"), after.head_names.index("reading")
    assert torch.equal(after.heads[p], before.heads[p]) and not torch.equal(after.heads[r], before.heads[r])
    for rec in records(tmp_path / "run"):
        assert rec["reading/loss"] > 0
        assert rec["loss"] == pytest.approx(rec["reading/loss"] + rec["entities/loss"], rel=1e-5)


def test_column_mapping_and_truncation_is_logged(tmp_path, caplog):
    rows = [{"input": e.input, "yomi": e.targets["reading"], "pos": e.targets["pos"]}
            for e in short_examples("train", 16)[:8]]
    (tmp_path / "mapped.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="gpt2mh.train"):
        train(tiny_config(tmp_path, train_file=str(tmp_path / "mapped.jsonl"), columns={"reading": "yomi"},
                          heads=["reading", "pos"], max_length=30, max_steps=1))
    assert "reading 8" in caplog.text  # the data report: 8 rows with a reading target, from "yomi"
    assert re.search(r"truncated targets over max_length: .*pos \d+", caplog.text)


def step_gradients(cfg: TrainConfig, steps: int) -> tuple[list[dict], list[torch.Tensor]]:
    """Every parameter's gradient and the per-head losses of `steps` optimizer steps taken at the
    initial weights (optimizer.step captures the gradients instead of updating)."""
    from gpt2mh.train.distributed import Dist
    from gpt2mh.train.loop import train_step
    from gpt2mh.train.setup import setup

    run = setup(cfg, Dist())
    grads, losses = [], []
    run.optimizer.step = lambda: grads.append(
        {n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None})
    for _ in range(steps):
        losses.append(train_step(run)[0])
    return grads, losses


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_gradient_accumulation_equals_one_batch(tmp_path):
    # Gradients are compared before the optimizer sees them: AdamW divides by sqrt(v), so a rounding
    # difference in a near-zero gradient becomes an O(lr) weight difference, and no tolerance on the
    # weights follows from the maths. The gradients themselves are the same sum over the step's
    # labels (each head normalised by its label count over the whole step) in another order: two
    # micro-batch partial sums, then their sum. Reordering an fp32 sum moves each entry by a few
    # ulps (eps = 2**-23 ~ 1.2e-7) of the magnitudes summed; we allow 1e-5 * max|g| of the tensor
    # (~80 ulps; measured: under 1 ulp). A wrong normalisation (per micro-batch instead of per step)
    # would be off by a factor near 2.
    common = dict(batch_size=8, max_steps=3, max_grad_norm=None)
    one, one_loss = step_gradients(tiny_config(tmp_path, output_dir=str(tmp_path / "one"), **common), 3)
    acc, acc_loss = step_gradients(tiny_config(tmp_path, output_dir=str(tmp_path / "acc"),
                                               gradient_accumulation_steps=2, **common), 3)
    assert len(one) == len(acc) == 3 and one[0].keys() == acc[0].keys()
    for step, (g1, g2) in enumerate(zip(one, acc)):
        # a loss is a sum of positive terms: reordering it moves it by at most ~(terms) * eps, relative
        torch.testing.assert_close(acc_loss[step], one_loss[step], rtol=1e-5, atol=0)
        for k, g in g1.items():
            scale = float(g.abs().max())
            torch.testing.assert_close(g2[k], g, rtol=0, atol=1e-5 * scale, msg=f"step {step}: {k}")
    assert not torch.equal(one[0]["heads"], one[1]["heads"])  # the steps saw different batches


def test_add_a_head_to_a_fine_tuned_checkpoint(tmp_path):
    first = train(tiny_config(tmp_path, heads=["reading", "pos"], output_dir=str(tmp_path / "first")))
    tuned = MultiHeadGPT2.from_pretrained(first.last_checkpoint)
    assert tuned.head_names == ("reading", "pos")
    result = train(tiny_config(tmp_path, base=first.last_checkpoint, model_config=None, heads=None,
                               add_heads=["entities"], train_heads=["entities"], freeze_trunk=True,
                               weight_decay=0.1, output_dir=str(tmp_path / "second")))
    model = MultiHeadGPT2.from_pretrained(result.last_checkpoint)
    assert model.head_names == ("reading", "pos", "entities")
    for k, v in trunk(tuned).items():
        assert torch.equal(v, model.state_dict()[k]), k
    for h in ("reading", "pos"):
        assert torch.equal(model.heads[model.head_names.index(h)], tuned.heads[tuned.head_names.index(h)])
    lm_head = tuned.transformer.wte.weight.t()  # where a new head starts
    assert not torch.equal(model.heads[2], lm_head)
    assert (model.heads[2] - lm_head).abs().max() < 1.0  # moved from the LM head, not from a random init


def test_gradient_checkpointing_and_dropout_override(tmp_path):
    base = base_checkpoint(tmp_path / "base")  # saved without dropout
    common = dict(base=str(base), model_config=None, max_steps=2)
    plain = train(tiny_config(tmp_path, output_dir=str(tmp_path / "plain"), **common))
    ckpt = train(tiny_config(tmp_path, output_dir=str(tmp_path / "gc"), gradient_checkpointing=True, **common))
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-6)
    drop = train(tiny_config(tmp_path, output_dir=str(tmp_path / "drop"), dropout=0.3, **common))
    assert drop.losses[0] != pytest.approx(plain.losses[0], abs=1e-4)
    saved = json.loads(open(f"{drop.last_checkpoint}/config.json").read())
    assert saved["attn_pdrop"] == saved["resid_pdrop"] == saved["embd_pdrop"] == 0.3


def test_set_dropout_reaches_every_dropout_attentions_included():
    from gpt2mh.config import GPT2Config
    from gpt2mh.model import GPT2
    from gpt2mh.train.setup import set_dropout
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    model = GPT2(cfg, ["a"]).train()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    quiet = model(ids)
    set_dropout(model, 0.3)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 1 + 3 * cfg.n_layer and all(m.p == 0.3 for m in drops)  # wte/wpe, attention, 2 residual
    assert model.config.attn_pdrop == 0.3
    for b in model.transformer.h:  # only attention dropout left on: training output must change
        b.attn.resid_dropout.p = b.mlp.dropout.p = 0.0
    model.transformer.drop.p = 0.0
    assert not torch.allclose(model(ids), quiet)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, learning_rate=1e30, max_grad_norm=None, max_steps=6, save_every=1)
    with pytest.raises(TrainingDiverged, match=r"at step \d+ for head\(s\) (reading|entities|pos)") as err:
        train(cfg)
    assert "last good checkpoint" in str(err.value)
    last = latest_checkpoint(tmp_path / "run")
    assert last is not None and str(last) in str(err.value)
    model = MultiHeadGPT2.from_pretrained(last)  # refuses non-finite weights, so this proves they are finite
    assert model.head_names == tuple(HEADS)


def test_evaluate_metrics(tmp_path):
    base = base_checkpoint(tmp_path / "base")
    model = MultiHeadGPT2.from_pretrained(base)
    examples = list(short_examples("test", 16)[:3])
    m = evaluate(model, tokenizer(), examples, ["reading", "pos"], samples=2, max_new_tokens=4)
    for h in ("reading", "pos"):
        assert m[f"{h}/perplexity"] == pytest.approx(math.exp(m[f"{h}/loss"]), rel=1e-5)
        assert m[f"{h}/tokens"] > 0 and 0 <= m[f"{h}/char_accuracy"] <= 1 and 0 <= m[f"{h}/exact_match"] <= 1
    assert m["loss"] == pytest.approx(m["reading/loss"] + m["pos/loss"])
    assert "entities/loss" not in m
    assert torch.equal(model.heads, MultiHeadGPT2.from_pretrained(base).heads)


def test_eval_early_stopping_and_epochs(tmp_path):
    # 12 rows, 3 held out; epochs=3 -> ceil(3 * 9 / 4) = 7 steps. greater_is_better on a falling loss:
    # the first evaluation stays the best, so patience 2 stops the run at step 3.
    result = train(tiny_config(tmp_path, validation_fraction=0.25, epochs=3.0, eval_every=1, eval_samples=0,
                               greater_is_better=True, early_stopping_patience=2))
    assert result.stopped_early and result.steps == 3 and result.best_checkpoint.endswith("checkpoint-1")
    evals = records(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [1, 2, 3] and {"reading/perplexity", "pos/loss"} <= set(evals[0])


# ---- configuration -----------------------------------------------------------------------------
def test_config_from_toml_and_json(tmp_path):
    (tmp_path / "run.toml").write_text(
        'train_file = "t.jsonl"\nheads = ["reading", "pos"]\nbase = "rinna/japanese-gpt2-small"\n'
        'learning_rate = 1e-4\nadam_betas = [0.9, 0.95]\n[loss_weights]\nreading = 2.0\n', encoding="utf-8")
    cfg = TrainConfig.from_file(tmp_path / "run.toml")
    assert cfg.heads == ["reading", "pos"] and cfg.loss_weights == {"reading": 2.0}
    assert cfg.adam_betas == (0.9, 0.95) and cfg.learning_rate == 1e-4 and cfg.batch_size == 8
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    assert TrainConfig.from_file(tmp_path / "run.json") == cfg


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="'lerning_rate' \\(did you mean 'learning_rate'\\?\\)"):
        TrainConfig.from_dict({"train_file": "t.jsonl", "base": "x", "lerning_rate": 1e-4})
    (tmp_path / "bad.toml").write_text('train_file = "t.jsonl"\nbase = "x"\nwarmup = 10\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.toml: .*'warmup' \(did you mean 'warmup_steps'\?\)"):
        TrainConfig.from_file(tmp_path / "bad.toml")
    with pytest.raises(TypeError, match="batch_size must be int"):
        TrainConfig(train_file="t.jsonl", base="x", batch_size="8")
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(train_file="t.jsonl", base="x", lr_schedule="cosin")
    with pytest.raises(ValueError, match="divisible"):
        TrainConfig(train_file="t.jsonl", base="x", batch_size=6, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="model_config"):
        TrainConfig(train_file="t.jsonl")


# ---- real data ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_heads_learn_different_tasks_from_scratch(tmp_path):
    """Three heads on one small trunk, trained from scratch on hironsancorpus: each head's held-out
    output scores well on its own task and far better than the other heads' outputs do on it."""
    train_file = write_jsonl(tmp_path / "train.jsonl", list(short_examples("train", 24)))
    test = list(short_examples("test", 24)[:16])
    # Tuned on 2 busy CPU cores (1 thread): ~1.5-3 minutes. Across seeds 0-2 the reading head scored
    # 0.07-0.10 (its outputs are katakana of about the right length), entities 0.31 (it learned the
    # frequent "なし"), pos 0.44-0.54; every other head scored <= 0.015 on each of those tasks.
    cfg = TrainConfig(train_file=str(train_file), heads=list(HEADS), output_dir=str(tmp_path / "run"),
                      model_config=dict(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0),
                      max_length=128, batch_size=4, max_steps=200, learning_rate=5e-3, warmup_steps=5,
                      lr_schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0, eval_every=0, save_every=0,
                      log_every=50, progress=False, seed=0)
    result = train(cfg)
    model = MultiHeadGPT2.from_pretrained(result.last_checkpoint)
    preds = generate_predictions(model, tokenizer(), test, max_new_tokens=48)
    # score[task][head]: the head's outputs scored against the task's references
    score = {task: {h: sum(char_accuracy(p, e.targets[task]) for p, e in zip(preds[h], test)) / len(test)
                    for h in HEADS} for task in HEADS}
    print(json.dumps(score, indent=1))
    for task in HEADS:
        other = max(v for h, v in score[task].items() if h != task)
        assert score[task][task] >= max(2 * other, other + 0.04), (task, score)
