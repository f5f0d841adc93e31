"""AI feedback labeling: both orders, principle ensembles, chain-of-thought clamp, keyed relabeling, diagnostics."""

import math

import pytest

from cai.backends import Sampling
from cai.backends.fake import FakeBackend
from cai.constitution import load_constitution
from cai.feedback import LabelSettings, label_diagnostics, label_pairs, label_requests, sample_pairs
from cai.prompts import PromptRecord
from cai.store import JsonlStore
from cai.templates import load_template

from .conftest import ASSETS


class PreferBackend(FakeBackend):
    """Scores option A with a fixed log-prob gap depending on what the prompt shows as (A).

    bias: extra log-odds for the letter A whatever the answers (position bias).
    The answer containing 'good' gets `quality` extra log-odds.
    """

    def __init__(self, bias=0.0, quality=0.0):
        super().__init__("prefer")
        self.bias, self.quality = bias, quality
        self.prompts = []

    def option_logprobs(self, prompts, options):
        self.prompts += prompts
        rows = []
        for p in prompts:
            shown_a = p.split("(A) ", 1)[1].split("\n", 1)[0]
            x = self.bias + (self.quality if "good" in shown_a else -self.quality if "good" in p else 0.0)
            # log-probs of A and B with P(A) = sigmoid(x), scaled down as a real model's would be
            rows.append([-1.0 - math.log1p(math.exp(-x)), -1.0 - math.log1p(math.exp(x))])
        return rows


def settings(k=2, cot=False):
    t = "prompts/templates/"
    return LabelSettings(seed=0, principles_per_pair=k, conversation_template=load_template(t + "conversation.txt"),
                         template=load_template(t + "feedback_mc.txt"), cot=cot,
                         cot_template=load_template(t + "feedback_cot.txt"),
                         cot_answer=load_template(t + "feedback_cot_answer.txt"),
                         cot_sampling=Sampling(max_new_tokens=6, temperature=0.0))


def pairs(n=4):
    return [{"key": f"pair{i}", "prompt_id": f"p{i}", "prompt": f"question {i}",
             "answer_a": "a good answer" if i % 2 == 0 else "a bad answer",
             "answer_b": "a bad answer" if i % 2 == 0 else "a good answer"} for i in range(n)]


@pytest.fixture
def constitution():
    return load_constitution(ASSETS / "constitutions" / "good.yaml")


def test_both_orders_debias_a_pure_position_bias(tmp_path, constitution):
    backend = PreferBackend(bias=2.0)  # always prefers the letter A: no information
    comps, stats = label_pairs(pairs(), constitution, settings(k=2), backend, JsonlStore(tmp_path / "l.jsonl"),
                               tmp_path / "plans", 4, progress=False)
    assert stats.generated == 4 * 2 * 2  # pairs x principles x orders
    for c in comps:
        assert c["soft_label"] == pytest.approx(0.5) and c["agree"] is False
        for pr in c["principles"]:
            assert pr["p_a_first"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    d = label_diagnostics(comps)
    assert d["position_consistency"] == 0.0 and d["share_near_half"] == 1.0
    # every scored prompt ends just before the option letter
    assert all(p.endswith("The answer is: (") for p in backend.prompts)


def test_quality_signal_survives_the_swap_and_principles_average(tmp_path, constitution):
    backend = PreferBackend(bias=1.0, quality=2.0)
    comps, _ = label_pairs(pairs(), constitution, settings(k=2), backend, JsonlStore(tmp_path / "l.jsonl"),
                           tmp_path / "plans", 8, progress=False)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # good answer shown as (A): x = 1 + 2; shown as (B): x = 1 - 2 -> P(good) = 1 - sig(-1)
    p_good = (sig(3.0) + (1 - sig(-1.0))) / 2
    for c in comps:
        expected = p_good if "good" in c["answer_a"] else 1 - p_good
        assert c["soft_label"] == pytest.approx(expected)
        assert len(c["principles"]) == 2 and len({p["id"] for p in c["principles"]}) == 2
        assert c["agree"] is True
    assert label_diagnostics(comps)["position_consistency"] == 1.0


def test_cot_reasons_first_and_clamps(tmp_path, constitution):
    backend = PreferBackend(quality=5.0)
    comps, _ = label_pairs(pairs(2), constitution, settings(k=1, cot=True), backend,
                           JsonlStore(tmp_path / "l.jsonl"), tmp_path / "plans", 4, progress=False)
    for c in comps:
        assert c["soft_label"] == pytest.approx(0.6 if "good" in c["answer_a"] else 0.4)
        reasoning = c["principles"][0]["reasoning"]
        assert all(reasoning)
    # the scored prompt is: reasoning prompt + generated reasoning + the answer line
    assert all("Let's think step by step:" in p and p.endswith("the better response is: (") for p in backend.prompts)


def test_editing_one_feedback_principle_relabels_only_its_pairs(tmp_path, constitution):
    import dataclasses

    store_path = tmp_path / "l.jsonl"
    s = settings(k=1)
    ps = pairs(12)
    label_pairs(ps, constitution, s, PreferBackend(quality=1.0), JsonlStore(store_path), tmp_path / "plans", 4, False)
    reqs = label_requests(ps, constitution, s, "fake:prefer")
    target = reqs[0].meta["principle_id"]
    users = {r.meta["pair_key"] for r in reqs if r.meta["principle_id"] == target}
    assert 0 < len(users) < len(ps)
    edited = dataclasses.replace(constitution, feedback=tuple(
        dataclasses.replace(p, question=p.question + " Explain.") if p.id == target else p for p in constitution.feedback))
    _, stats = label_pairs(ps, edited, s, PreferBackend(quality=1.0), JsonlStore(store_path), tmp_path / "plans", 4, False)
    assert stats.generated == 2 * len(users) and stats.reused == 2 * (len(ps) - len(users))


def test_human_agreement_on_shared_pairs(constitution, tmp_path):
    comps, _ = label_pairs(pairs(4), constitution, settings(k=1), PreferBackend(quality=2.0),
                           JsonlStore(tmp_path / "l.jsonl"), tmp_path / "plans", 4, False)
    human = [
        # pair0: good answer is answer_a; human agrees, but lists the answers swapped (so 0.0 = prefers good)
        {"prompt": "question 0", "answer_a": "a bad answer", "answer_b": "a good answer", "soft_label": 0.0},
        # pair1: good answer is answer_b; human disagrees (prefers the bad one)
        {"prompt": "question 1", "answer_a": "a bad answer", "answer_b": "a good answer", "soft_label": 1.0},
        {"prompt": "question 2", "answer_a": "a good answer", "answer_b": "a bad answer", "soft_label": 0.5},  # tie
        {"prompt": "not labeled by AI", "answer_a": "x", "answer_b": "y", "soft_label": 1.0},
    ]
    d = label_diagnostics(comps, human)
    assert d["human_shared"] == 2 and d["human_agreement"] == 0.5


def test_labeling_with_the_tiny_model(tmp_path, constitution):
    from cai.backends import make_backend

    backend = make_backend("transformers", "tiny", dtype="float32")
    backend.progress = False
    store = JsonlStore(tmp_path / "steps.jsonl")
    prompts = [PromptRecord(f"p{i}", f"Tell me about topic {i}.") for i in range(3)]
    ps, _ = sample_pairs(prompts, backend, Sampling(max_new_tokens=6, temperature=1.0), 0, store, tmp_path / "plans", 4, False)
    assert len(ps) == 3 and all(p["answer_a"] != p["answer_b"] for p in ps)
    comps, stats = label_pairs(ps, constitution, settings(k=2), backend, store, tmp_path / "plans", 4, False)
    assert stats.generated == 3 * 2 * 2
    for c in comps:
        assert 0.0 < c["soft_label"] < 1.0
        for pr in c["principles"]:
            assert 0.0 < pr["p_a_first"] < 1.0 and 0.0 < pr["p_a_swapped"] < 1.0
    # a rerun reuses every score
    _, stats = label_pairs(ps, constitution, settings(k=2), backend, store, tmp_path / "plans", 4, False)
    assert stats.generated == 0 and stats.reused == 12
