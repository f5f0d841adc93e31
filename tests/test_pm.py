"""Preference model on the tiny preset: reward position with pad == eos, the soft-label loss, a short training run."""

import json
import math

import pytest
import torch

import cai.train.pm
from cai.errors import CaiError
from cai.losses import soft_bt_loss
from cai.models import load_tokenizer, resolve_model
from cai.store import Metrics
from cai.train.common import TRAIN_INFO, trained_model_matches
from cai.train.pm import (
    PMConfig,
    SoftLabelRewardTrainer,
    comparisons_dataset,
    conversation,
    evaluate_pm,
    init_pm,
    load_pm,
    pm_rewards,
    pm_training_key,
    reward_config,
    score_answers,
    split_comparisons,
    train_pm,
)


@pytest.fixture(scope="module")
def tiny():
    ref = resolve_model("tiny")
    tokenizer = load_tokenizer(ref)
    return ref, tokenizer


def chat_ids(tokenizer, prompt, answer):
    return tokenizer.apply_chat_template(conversation(prompt, answer), tokenize=True, return_dict=True)["input_ids"]


def yes_no_comparisons(n, label=0.9):
    """The preferred answer always says yes; which side holds it alternates."""
    out = []
    for i in range(n):
        a_is_yes = i % 2 == 0
        yes, no = "yes yes yes", "no no no"
        out.append({"key": f"cmp-{i:03d}", "prompt": f"question number {i}: is it {['red', 'blue', 'big'][i % 3]}?",
                    "answer_a": yes if a_is_yes else no, "answer_b": no if a_is_yes else yes,
                    "soft_label": label if a_is_yes else 1 - label})
    return out


def test_reward_is_read_at_the_last_real_token_when_pad_is_eos(tiny):
    ref, tok = tiny
    assert tok.pad_token_id == tok.eos_token_id
    model = init_pm(ref, tok, seed=0).eval()
    short = chat_ids(tok, "hi", "yes yes")[:-1]  # drop the template's trailing newline: ends in <|im_end|> == pad
    assert short[-1] == tok.pad_token_id
    long = chat_ids(tok, "hello there, how are you today?", "no no no no")
    width = len(long) + 1
    with torch.no_grad():
        alone = pm_rewards(model, torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))
        one_early = pm_rewards(model, torch.tensor([short[:-1]]), torch.ones(1, len(short) - 1, dtype=torch.long))
        for side in ("right", "left"):
            ids = torch.full((2, width), tok.pad_token_id)
            mask = torch.zeros((2, width), dtype=torch.long)
            for row, seq in enumerate((short, long)):
                span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
                ids[row, span], mask[row, span] = torch.tensor(seq), 1
            padded = pm_rewards(model, ids, mask)
            assert padded[0].item() == pytest.approx(alone.item(), abs=1e-5), side
            assert abs(padded[0].item() - one_early.item()) > 1e-3, side
        # transformers' own pooling (the last token that is not the pad id) reads one token early here
        right = torch.full((1, width), tok.pad_token_id)
        right[0, :len(short)] = torch.tensor(short)
        builtin = model(input_ids=right, attention_mask=(torch.arange(width) < len(short)).long()[None]).logits
        assert builtin.item() == pytest.approx(one_early.item(), abs=1e-5)


def test_trainer_loss_is_the_soft_label_loss(tiny, tmp_path):
    ref, tok = tiny
    model = init_pm(ref, tok, seed=0)
    with torch.no_grad():
        model.score.weight *= 100  # rewards far enough apart that soft and hard losses clearly differ
    comparisons = yes_no_comparisons(4, label=0.5)  # no preference: the loss should pull r_a - r_b toward 0
    cfg = PMConfig(batch_size=4, bf16="false")  # fp32, so the hand computation matches to rounding
    trainer = SoftLabelRewardTrainer(model=model, args=reward_config(cfg, 0, tmp_path / "ckpt", "cpu", False),
                                     train_dataset=comparisons_dataset(comparisons), processing_class=tok)
    assert "soft_label" in trainer.train_dataset.column_names
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["soft_label"].dtype == torch.float32 and batch["soft_label"].tolist() == [0.5] * 4
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    rewards = pm_rewards(model, batch["input_ids"], batch["attention_mask"])
    r_chosen, r_rejected = rewards.chunk(2)
    assert loss.item() == pytest.approx(soft_bt_loss(r_chosen, r_rejected, 0.5).item(), abs=1e-6)
    hard = -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean()
    assert abs(loss.item() - hard.item()) > 1e-3  # not TRL's hard-label loss

    gap_before = (r_chosen - r_rejected).abs().mean().item()
    assert gap_before > 1e-2
    loss.backward()
    with torch.no_grad():  # one small SGD step
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-4 * p.grad
        r_chosen, r_rejected = pm_rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
    assert (r_chosen - r_rejected).abs().mean().item() < gap_before


def test_train_pm_learns_evaluates_and_saves(tiny, tmp_path):
    ref, tok = tiny
    comparisons = yes_no_comparisons(40)
    cfg = PMConfig(epochs=3, learning_rate=3e-3, batch_size=8, eval_fraction=0.25, save_steps=1000,
                   max_length=128)
    train, heldout = split_comparisons(comparisons, cfg.eval_fraction)
    assert len(heldout) >= 5 and len(train) + len(heldout) == 40
    assert split_comparisons(list(reversed(comparisons)), cfg.eval_fraction)[1] == list(reversed(heldout))

    key = pm_training_key("0" * 64, ref, cfg, seed=0)
    assert key != pm_training_key("0" * 64, ref, PMConfig(epochs=2), seed=0)
    out = tmp_path / "pm"
    metrics = Metrics(tmp_path / "metrics.jsonl", "rl")
    s = train_pm(comparisons, ref, cfg, 0, out, tmp_path / "ckpt", metrics, key, device="cpu", progress=False)

    assert s["counts"] == {"comparisons": 40, "train": len(train), "train_too_long": 0, "heldout": len(heldout)}
    assert s["heldout"]["accuracy"] >= 0.8, s["heldout"]
    table = s["heldout"]["calibration"]
    assert sum(b["count"] for b in table) == len(heldout) == s["heldout"]["count"]
    assert all(b["lo"] <= b["mean_predicted"] <= b["hi"] for b in table)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / TRAIN_INFO).read_text())["key"] == key and trained_model_matches(out, key)
    assert not (tmp_path / "ckpt" / key).exists()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("rl/pm/train/loss" in m for m in logged) and any("rl/pm/heldout/accuracy" in m for m in logged)

    from safetensors.torch import load_file

    before = init_pm(ref, tok, seed=0).state_dict()
    after = load_file(out / "model.safetensors")
    changed = [k for k in after if not torch.equal(after[k].float(), before[k].float())]
    assert "score.weight" in changed and len(changed) > len(after) // 2

    model, tokenizer = load_pm(out, device="cpu", dtype="float32")
    yes, no = score_answers(model, tokenizer, ["is it blue?", "is it blue?"], ["yes yes yes", "no no no"])
    assert yes > no
    again = evaluate_pm(model, tokenizer, heldout)
    assert again["accuracy"] == s["heldout"]["accuracy"]
    assert again["loss"] == pytest.approx(s["heldout"]["loss"], abs=1e-4)


def test_evaluate_pm_leaves_ties_out_of_accuracy(tiny):
    ref, tok = tiny
    model = init_pm(ref, tok, seed=0).train()
    comparisons = yes_no_comparisons(4) + [{"key": "tie", "prompt": "q", "answer_a": "x", "answer_b": "y",
                                            "soft_label": 0.5}]
    result = evaluate_pm(model, tok, comparisons)
    assert result["count"] == 5 and result["decisive"] == 4
    assert sum(b["count"] for b in result["calibration"]) == 5
    assert math.isfinite(result["loss"]) and result["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert model.training  # evaluation restores the mode it found


def test_non_finite_loss_stops_before_saving_and_a_rerun_resumes(tiny, tmp_path, monkeypatch):
    ref, _ = tiny
    calls = []

    def nan_on_third_step(r_a, r_b, p):
        calls.append(1)
        loss = soft_bt_loss(r_a, r_b, p)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(cai.train.pm, "soft_bt_loss", nan_on_third_step)
    cfg = PMConfig(epochs=2, batch_size=4, eval_fraction=0.0, max_length=128, save_steps=1)
    out, ckpt, metrics = tmp_path / "pm", tmp_path / "ckpt", Metrics(tmp_path / "m.jsonl", "rl")
    with pytest.raises(CaiError, match="PM loss is not finite .* at step 2"):
        train_pm(yes_no_comparisons(8), ref, cfg, 0, out, ckpt, metrics, "k", device="cpu", progress=False)
    assert not out.exists()
    assert (ckpt / "k" / "checkpoint-2" / "trainer_state.json").exists()  # the last good step is kept

    monkeypatch.setattr(cai.train.pm, "soft_bt_loss", soft_bt_loss)
    s = train_pm(yes_no_comparisons(8), ref, cfg, 0, out, ckpt, metrics, "k", device="cpu", progress=False)
    assert s["resumed_from"].endswith("checkpoint-2") and s["steps"] == 4
    assert s["heldout"]["count"] == 0 and s["heldout"]["accuracy"] is None
    assert (out / "model.safetensors").exists()


def test_bad_comparison_names_the_record_and_field(tiny, tmp_path):
    ref, _ = tiny
    bad = yes_no_comparisons(3)
    bad[1]["soft_label"] = 1.5
    with pytest.raises(CaiError, match=r"comparisons\[1\] \(key=cmp-001\): field 'soft_label'"):
        train_pm(bad, ref, PMConfig(), 0, tmp_path / "pm", tmp_path / "ckpt", Metrics(tmp_path / "m.jsonl", "rl"),
                 "k", device="cpu", progress=False)


def test_length_correction_is_fitted_on_training_answers_saved_and_applied(tiny, tmp_path):
    """A PM trained where the preferred answer is only ever the longer one learns length; the fitted slope is the
    least-squares slope of its rewards in answer tokens, load_pm applies it, and the corrected margin between two
    answers that differ only in length is smaller than the raw one. Off: nothing is subtracted, and the training
    key is the one a PM had before the option existed."""
    from cai.train.pm import _as_dict, answer_tokens, fit_length_correction

    ref, tok = tiny
    comparisons = []
    for i in range(32):
        long, short = "ok " * (4 + i % 4), "ok " * (1 + i % 2)
        a_long = i % 2 == 0
        comparisons.append({"key": f"len-{i:03d}", "prompt": f"question {i}?", "answer_a": long if a_long else short,
                            "answer_b": short if a_long else long, "soft_label": 0.9 if a_long else 0.1})
    cfg = PMConfig(epochs=3, learning_rate=3e-3, batch_size=8, eval_fraction=0.0, save_steps=1000, max_length=64,
                   clear_pairs="")
    out = tmp_path / "pm"
    s = train_pm(comparisons, ref, cfg, 0, out, tmp_path / "ckpt", Metrics(tmp_path / "m.jsonl", "rl"), "k",
                 device="cpu", progress=False)
    c = s["length_correction"]
    assert c["enabled"] and c["answers"] == 64 and c["slope"] > 0 and c["corr"] > 0.5

    model, tokenizer = load_pm(out, device="cpu", dtype="float32")
    assert model.cai_length_slope == pytest.approx(c["slope"])
    answers = [x for cmp in comparisons for x in (cmp["answer_a"], cmp["answer_b"])]
    prompts = [cmp["prompt"] for cmp in comparisons for _ in (0, 1)]
    corrected = score_answers(model, tokenizer, prompts, answers)
    model.cai_length_slope = 0.0
    raw = score_answers(model, tokenizer, prompts, answers)
    n = answer_tokens(tokenizer, answers)
    assert corrected == pytest.approx([r - c["slope"] * k for r, k in zip(raw, n)], abs=1e-5)
    x, y = torch.tensor(n, dtype=torch.float64), torch.tensor(raw, dtype=torch.float64)
    want = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert c["slope"] == pytest.approx(want.item(), rel=1e-3)
    assert fit_length_correction(model, tokenizer, comparisons)["slope"] == pytest.approx(c["slope"], rel=1e-3)

    def margin(scores):  # mean reward of the long answers minus the short ones
        longs = [v for v, a in zip(scores, answers) if len(a.split()) >= 4]
        shorts = [v for v, a in zip(scores, answers) if len(a.split()) < 4]
        return sum(longs) / len(longs) - sum(shorts) / len(shorts)

    assert margin(raw) > 0 and abs(margin(corrected)) < 0.5 * margin(raw)

    off = PMConfig(length_correction=False)
    assert "length_correction" not in _as_dict(off) and "length_correction" in _as_dict(PMConfig())
    s_off = train_pm(comparisons, ref, PMConfig(**{**cfg.__dict__, "length_correction": False}), 0, tmp_path / "off",
                     tmp_path / "ckpt", Metrics(tmp_path / "m.jsonl", "rl"), "k2", device="cpu", progress=False)
    assert not s_off["length_correction"]["enabled"] and s_off["clear_pairs_uncorrected"] is None
    assert load_pm(tmp_path / "off", device="cpu")[0].cai_length_slope == 0.0
