"""A DPO policy's implicit reward on clear pairs (cai.train.dpo.clear_pair_check), on the real tiny model."""

import json

import pytest
import torch

import cai.train.dpo as dpo
from cai.config import DPOConfig
from cai.models import load_causal_lm, load_tokenizer, resolve_model
from cai.store import Metrics
from cai.train.common import TRAIN_INFO, clear_pair_stats
from cai.train.dpo import answer_logprobs, clear_pair_check, train_dpo


def test_clear_pair_stats_counts_ties_as_wrong_and_splits_by_category_and_length():
    rows = [{"category": "harmless", "better": "a b c", "worse": "a"}, {"category": "harmless", "better": "a b",
             "worse": "a b"}, {"category": "helpful", "better": "a", "worse": "a b c"}]
    s = clear_pair_stats(rows, [1.0, 0.0, 2.0], [0.0, 0.0, 3.0], left_out=4)
    assert s["accuracy"] == pytest.approx(1 / 3) and s["left_out"] == 4 and s["count"] == 3
    assert s["by_category"] == {"harmless": {"count": 2, "accuracy": 0.5}, "helpful": {"count": 1, "accuracy": 0.0}}
    assert s["by_length"] == {"better_longer": {"count": 1, "accuracy": 1.0},
                              "better_shorter": {"count": 1, "accuracy": 0.0},
                              "same_length": {"count": 1, "accuracy": 0.0}}
    assert s["mean_margin"] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        clear_pair_stats(rows, [1.0], [0.0])


def test_answer_logprobs_are_the_answer_tokens_of_the_chat_alone_and_in_padded_batches():
    ref = resolve_model("tiny")
    tok, model = load_tokenizer(ref), load_causal_lm(ref, dtype="float32", device="cpu")
    prompts = ["Hi?", "What is the capital of France, and why is it there?", "Tell me a joke."]
    answers = ["Hello there.", "Paris.", "A long answer that goes on for a while, with several words in it."]
    batched = answer_logprobs(model, tok, prompts, answers, batch_size=3)
    for p, a, got in zip(prompts, answers, batched):
        head = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                                       tokenize=True, return_dict=True)["input_ids"]
        assert full[:len(head)] == head  # the answer's tokens are the rest of the chat
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
        want = [logp[t - 1, full[t]].item() for t in range(len(head), len(full))]
        assert got == pytest.approx(want, abs=1e-4) and all(x <= 0 for x in got)
    one_by_one = answer_logprobs(model, tok, prompts, answers, batch_size=1)
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in zip(one_by_one, batched))


def _clear(prompts, better="Sure, here it is.", worse="No."):
    return [{"id": f"c{i}", "category": "harmless" if i % 2 else "helpful", "prompt": p, "better": better,
             "worse": worse} for i, p in enumerate(prompts)]


def test_the_starting_model_checked_against_itself_has_no_implicit_reward():
    ref = resolve_model("tiny")
    s = clear_pair_check(ref, ref, _clear(["a?", "b?", "c?"]), {"c?"}, beta=0.1, device="cpu", progress=True)
    assert s["count"] == 2 and s["left_out"] == 1
    assert s["accuracy"] == 0.0 and s["mean_margin"] == 0.0  # every reward 0: ties are not right
    assert s["start_likelihood_accuracy"] == s["policy_likelihood_accuracy"]
    assert s["by_length"] == {"better_longer": {"count": 2, "accuracy": 0.0}}  # "Sure, here it is." against "No."


def test_dpo_reports_and_reuses_its_implicit_reward_on_unseen_clear_pairs(tmp_path, monkeypatch):
    """DPO that prefers one answer over another on some prompts ranks the same answers on prompts it never saw by
    its implicit reward (above chance, where the untrained model has no reward at all); the check is kept with
    the reused model, and redone when the clear pairs change."""
    ref = resolve_model("tiny")
    good, bad = "Sure, here it is.", "No."
    comparisons = [{"prompt": f"question number {i}?", "answer_a": good, "answer_b": bad, "soft_label": 0.9}
                   for i in range(8)]
    clear = _clear([f"another question {i}?" for i in range(6)] + ["question number 0?"], good, bad)
    cfg = DPOConfig(batch_size=4, max_length=64, learning_rate=1e-3, epochs=2)
    out, metrics = tmp_path / "dpo", Metrics(tmp_path / "m.jsonl", "rl")
    s = train_dpo(comparisons, ref, cfg, 0, out, tmp_path / "ckpt", metrics, "card", device="cpu", progress=False,
                  clear=clear)
    c = s["clear_pairs"]
    assert c["count"] == 6 and c["left_out"] == 1  # the prompt DPO trained on is left out
    assert c["accuracy"] == 1.0 and c["mean_margin"] > 0
    assert c["policy_likelihood_accuracy"] >= c["start_likelihood_accuracy"]
    assert json.loads((out / TRAIN_INFO).read_text())["clear_pairs"] == c
    assert any("rl/dpo/clear_pairs/accuracy" in line for line in (tmp_path / "m.jsonl").read_text().splitlines())

    def no_check(*a, **k):
        raise AssertionError("checked again")

    monkeypatch.setattr(dpo, "clear_pair_check", no_check)
    again = train_dpo(comparisons, ref, cfg, 0, out, tmp_path / "ckpt", metrics, "card", device="cpu",
                      progress=False, clear=clear)
    assert again["reused"] and again["clear_pairs"] == c
    monkeypatch.undo()
    other = train_dpo(comparisons, ref, cfg, 0, out, tmp_path / "ckpt", metrics, "card", device="cpu",
                      progress=False, clear=clear[:3])
    assert other["reused"] and other["clear_pairs"]["count"] == 3
    assert json.loads((out / TRAIN_INFO).read_text())["clear_pairs"]["count"] == 3
    assert "reused" not in json.loads((out / TRAIN_INFO).read_text())


def test_the_bundled_clear_pairs_do_not_reward_length():
    """As many pairs whose better answer is the shorter as the longer, in each category, so a scorer that prefers
    the longer (or the shorter) answer is at chance on them."""
    from cai.prompts import load_labeled_set
    from cai.train.common import length_side

    rows = load_labeled_set("prompts/sets/labeled_pairs.jsonl")
    for cat in ("harmless", "helpful"):
        sides = [length_side(r) for r in rows if r["category"] == cat]
        assert sides.count("better_longer") == sides.count("better_shorter") == len(sides) // 2
    longer = clear_pair_stats(rows, [len(r["better"]) for r in rows], [len(r["worse"]) for r in rows])
    assert longer["accuracy"] == 0.5
    assert len({r["prompt"] for r in rows}) == len(rows)
