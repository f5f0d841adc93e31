"""Pair sources (cai.pair_sources): assignment by weight, each source's pairs and labels, keys, resume, and the
incremental rerun after a principle edit; on the fake backend for control flow and on the tiny model end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cai.backends import Sampling
from cai.backends.fake import FakeBackend
from cai.config import load_config
from cai.constitution import load_constitution
from cai.pair_sources import (
    ContrastSettings,
    assign_sources,
    best_of_n_extremes,
    construction_labels,
    contrast_pairs,
    load_contrast_context,
    revision_pairs,
)
from cai.paths import PROJECT_ROOT
from cai.pipeline import main
from cai.prompts import PromptRecord
from cai.store import JsonlStore

from .conftest import ASSETS, tiny_sl_run


def prompts(n: int) -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", f"prompt number {i}?", "red") for i in range(n)]


def test_sources_are_assigned_by_weight_and_stay_put():
    ps = prompts(2000)
    got = assign_sources(ps, {"sample": 1.0, "contrast": 3.0}, seed=0)
    assert len(got["sample"]) + len(got["contrast"]) == 2000 and not got["revision"] and not got["best_of_n"]
    assert abs(len(got["contrast"]) / 2000 - 0.75) < 0.04  # share = weight / sum of weights
    # a prompt's source does not depend on the other prompts
    alone = assign_sources(ps[:7], {"sample": 1.0, "contrast": 3.0}, seed=0)
    assert {p.id for p in alone["contrast"]} == {p.id for p in got["contrast"] if p.id in {q.id for q in ps[:7]}}
    # a source that cannot serve a prompt leaves it to the others
    only = assign_sources(ps[:50], {"revision": 5.0, "sample": 1.0}, seed=0, eligible={"revision": {ps[0].prompt}})
    assert [p.id for p in only["revision"]] in ([], ["p0"]) and len(only["sample"]) + len(only["revision"]) == 50
    # a weight of 0 serves nothing; another seed draws differently
    assert assign_sources(ps[:50], {"sample": 1.0, "contrast": 0.0}, seed=0)["contrast"] == []
    other = assign_sources(ps, {"sample": 1.0, "contrast": 3.0}, seed=1)
    assert {p.id for p in other["contrast"]} != {p.id for p in got["contrast"]}


def test_revision_pairs_pair_the_initial_answer_with_the_last_revision():
    chains = {"q1": {"prompt": "q1", "initial_answer": "first", "answer_key": "k0", "model": "m",
                     "rounds": [{"revision": "middle", "revision_key": "k1"}, {"revision": "last", "revision_key": "k2"}]},
              "q2": {"prompt": "q2", "initial_answer": "same", "answer_key": "k3", "model": "m",
                     "rounds": [{"revision": "same", "revision_key": "k4"}]}}  # nothing to compare: skipped
    ps = [PromptRecord("a", "q1"), PromptRecord("b", "q2"), PromptRecord("c", "q3")]  # q3 has no chain
    pairs = revision_pairs(ps, chains)
    assert len(pairs) == 1 and {pairs[0]["answer_a"], pairs[0]["answer_b"]} == {"first", "last"}
    assert pairs[0]["source"] == "revision" and revision_pairs(ps, chains) == pairs  # keyed, deterministic


def contrast_settings(shots: int = 2, labels: str = "construction", harmless: str = "prompts/contrast/harmless.yaml"
                      ) -> ContrastSettings:
    return ContrastSettings({"red_team": load_contrast_context(harmless, shots),
                             "helpful": load_contrast_context("prompts/contrast/helpful.yaml", shots)}, labels, 0.9)


GENERATED_BOTH_SIDES = """\
positive:
  system: "Be harmless. {{principle}}"
  openers: ["I can't help with that."]
negative:
  system: "Do anything asked."
  openers: ["Sure!"]
few_shot:
  - {prompt: "q?", positive: "no", negative: "yes"}
"""


def test_contrast_pairs_are_keyed_labeled_by_construction_and_redone_only_where_a_principle_changed(tmp_path):
    const_path = tmp_path / "c.yaml"
    shutil.copyfile(ASSETS / "constitutions" / "good.yaml", const_path)
    backend, store = FakeBackend(), JsonlStore(tmp_path / "steps.jsonl")
    ps = prompts(12)
    sampling = Sampling(max_new_tokens=6, temperature=1.0)
    # the shipped harmless context: the positive answer is a refusal sentence alone (nothing generated for it)
    shipped = contrast_settings()
    sets = {p.prompt: "red_team" for p in ps}
    pairs, stats = contrast_pairs(ps, sets, load_constitution(str(const_path)), shipped, backend, sampling, 0, store,
                                  tmp_path / "plans", 4, progress=False)
    assert len(pairs) == 12 and stats.generated == 12
    refusals = set(shipped.contexts["red_team"].positive.openers)
    assert all((p["answer_a"] if p["positive_is_a"] else p["answer_b"]) in refusals for p in pairs)

    # a context whose both sides are generated, the positive one with the principle in its system line
    ctx = tmp_path / "both.yaml"
    ctx.write_text(GENERATED_BOTH_SIDES)
    s = contrast_settings(1, harmless=str(ctx))
    store = JsonlStore(tmp_path / "steps2.jsonl")
    pairs, stats = contrast_pairs(ps, sets, load_constitution(str(const_path)), s, backend, sampling, 0, store,
                                  tmp_path / "plans", 4, progress=False)
    assert len(pairs) == 12 and stats.generated == 24
    # each answer starts with an opener of its side, which the model continued
    for p in pairs:
        pos, neg = (p["answer_a"], p["answer_b"]) if p["positive_is_a"] else (p["answer_b"], p["answer_a"])
        assert pos.startswith("I can't help with that. ") and neg.startswith("Sure! ")
    # a helpful prompt gets the helpful context: its negative side refuses, its positive side has no opener
    (hp,), _ = contrast_pairs(ps[:1], {ps[0].prompt: "helpful"}, load_constitution(str(const_path)), s, backend,
                              sampling, 0, store, tmp_path / "plans", 4, progress=False)
    neg = hp["answer_b"] if hp["positive_is_a"] else hp["answer_a"]
    assert neg in s.contexts["helpful"].negative.openers  # a needless refusal, alone
    # the contexts: a system line from the principle, the few-shot turns, then the prompt
    labels = construction_labels(pairs, 0.9)
    for p, c in zip(pairs, labels):
        assert c["soft_label"] == (0.9 if p["positive_is_a"] else pytest.approx(0.1))
        assert c["annotator"] == "construction" and c["pair_source"] == "contrast" and c["agree"] is None
    assert 0 < sum(p["positive_is_a"] for p in pairs) < 12  # the positive answer is not always shown first

    # rerun: all reused
    again, stats = contrast_pairs(ps, sets, load_constitution(str(const_path)), s, backend, sampling, 0, store,
                                  tmp_path / "plans", 4, progress=False)
    assert stats.generated == 0 and again == pairs

    # edit one principle's text: exactly the prompts that drew it get new answers
    edited = const_path.read_text().replace("Rewrite the assistant's reply to be polite and respectful.",
                                            "Rewrite the assistant's reply to be kind and civil.")
    store = JsonlStore(tmp_path / "steps2.jsonl")
    const_path.write_text(edited)
    drew_rude = sum(p["principle_id"] == "rude" for p in pairs)
    assert 0 < drew_rude < 12
    after, stats = contrast_pairs(ps, sets, load_constitution(str(const_path)), s, backend, sampling, 0, store,
                                  tmp_path / "plans", 4, progress=False)
    assert stats.generated == drew_rude  # only the positive side's system line holds the principle
    changed = {p["prompt"] for p, q in zip(pairs, after) if p["key"] != q["key"]}
    assert changed == {p["prompt"] for p in pairs if p["principle_id"] == "rude"}


def test_contrast_context_file_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("positive: {system: x}\nnegative: {openers: [a]}\nfew_shot:\n- prompt: x\n  positive: y\n")
    with pytest.raises(Exception, match=r"few_shot\[0\]: expected keys"):
        load_contrast_context(str(bad), 1)
    bad.write_text("positive: {system: 'x {{other}}'}\nnegative: {openers: [a]}\n")
    with pytest.raises(Exception, match=r"unknown slot\(s\) \['other'\]"):
        load_contrast_context(str(bad), 0)
    bad.write_text("positive: {system: x}\nnegative: {}\n")
    with pytest.raises(Exception, match="negative: nothing sets this side apart"):
        load_contrast_context(str(bad), 0)
    with pytest.raises(Exception, match="contrast_shots=99"):
        load_contrast_context("prompts/contrast/harmless.yaml", 99)


def test_best_of_n_keeps_the_pair_of_the_best_and_the_worst_answer():
    def comp(a, b, p):
        return {"prompt": "q", "answer_a": a, "answer_b": b, "soft_label": p, "pair_key": a + b}

    # x beats y (0.8) and z (0.9); y beats z (0.6): means x 0.85, y 0.4, z 0.25 -> best x, worst z
    cs = [comp("x", "y", 0.8), comp("z", "x", 0.1), comp("y", "z", 0.6)]
    assert best_of_n_extremes(cs) == [cs[1]]


# --- end to end on the tiny model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sl_run(tmp_path_factory):
    return tiny_sl_run(tmp_path_factory.mktemp("sources"), 4)


def rl_args(root: Path, const: Path, **over) -> list[str]:
    args = {"stage": "rl", "run": "r", "runs_dir": str(root / "runs"), "constitution": str(const),
            "pair_sampling.max_new_tokens": 5, "red_team.limit": 4, "helpful.limit": 4,
            "feedback.labeler.model": "tiny", "feedback.principles_per_pair": 1, "pm.batch_size": 4,
            "pm.eval_fraction": 0.25, "algorithm": "none", "progress": False,
            "pairs.sample": 1, "pairs.revision": 1, "pairs.contrast": 1, "pairs.best_of_n": 1, "pairs.n": 3,
            "pairs.contrast_shots": 1}
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def test_every_source_end_to_end_with_reuse_and_resume(sl_run):
    root, const = sl_run
    main(rl_args(root, const))
    rl = root / "runs" / "r" / "rl"
    diag = json.loads((rl / "round-1" / "label_diagnostics.json").read_text())
    sources = diag["sources"]
    assert sum(v["prompts"] for v in sources.values()) == 8 and len(sources) >= 3
    comps = [json.loads(x) for x in (rl / "round-1" / "comparisons.jsonl").read_text().splitlines()]
    assert {c["pair_source"] for c in comps} == set(sources) - {k for k, v in sources.items() if not v["pairs"]}
    assert all(c["annotator"] == "construction" for c in comps if c["pair_source"] == "contrast")
    assert sum(len([c for c in comps if c["pair_source"] == s]) for s in sources) == len(comps)
    pm = json.loads((rl / "round-1" / "pm" / "cai_train.json").read_text())
    assert pm["clear_pairs"]["count"] == 80 and 0 <= pm["clear_pairs"]["accuracy"] <= 1

    # rerun: nothing generated or scored again
    main(rl_args(root, const))
    again = json.loads((rl / "round-1" / "label_diagnostics.json").read_text())
    assert again["answers_generated"] == 0 and again["scores_computed"] == 0

    # a run killed mid-way lost its last records: the rerun computes exactly those
    steps = rl / "steps.jsonl"
    lines = steps.read_text().splitlines(keepends=True)
    steps.write_text("".join(lines[:-5]))
    main(rl_args(root, const))
    resumed = json.loads((rl / "round-1" / "label_diagnostics.json").read_text())
    assert resumed["answers_generated"] + resumed["scores_computed"] == 5
    assert [json.loads(x) for x in (rl / "round-1" / "comparisons.jsonl").read_text().splitlines()] == comps


def test_sl_context_distillation_trains_on_the_positive_context_answers(tmp_path):
    const = tmp_path / "constitution.yaml"
    shutil.copyfile(ASSETS / "constitutions" / "good.yaml", const)
    args = ["stage=sl", "run=d", f"runs_dir={tmp_path / 'runs'}", f"constitution={const}", "generator.model=tiny",
            "red_team.limit=3", "critique.rounds=0", "critique.few_shot=0", "sampling.max_new_tokens=4",
            "sft.helpful_ratio=1", "sft.batch_size=4", "sft.data=contrast", "progress=false"]
    main(args)
    sft = [json.loads(x) for x in (tmp_path / "runs" / "d" / "sl" / "sft.jsonl").read_text().splitlines()]
    distilled = [e for e in sft if e["source"] == "contrast"]
    assert len(distilled) == 3 and sum(e["source"] == "helpful" for e in sft) == 3
    assert not any(e["source"] == "revision" for e in sft)
    openers = load_contrast_context("prompts/contrast/harmless.yaml", 0).positive.openers
    assert all(e["completion"][0]["content"] in openers for e in distilled)
    card = (tmp_path / "runs" / "d" / "sl" / "model" / "README.md").read_text()
    assert "3 answers under the positive contrast context" in card


def test_the_own_refusals_context_rejects_every_refusal_the_sl_model_is_trained_to_give():
    """quality_dpo.yaml's premise: the SL-CAI model's refusal targets (harmless.yaml's positive openers, what
    sft.data=contrast distills) are word for word among the rejected openers of helpful prompts, and the rest of
    the file is helpful.yaml's, so editing one of those files without the other breaks the test."""
    ctx = PROJECT_ROOT / "prompts" / "contrast"
    harmless = load_contrast_context(str(ctx / "harmless.yaml"), 0)
    helpful = load_contrast_context(str(ctx / "helpful.yaml"), 3)
    own = load_contrast_context(str(ctx / "helpful_own_refusals.yaml"), 3)
    assert set(harmless.positive.openers) <= set(own.negative.openers)
    assert set(own.negative.openers) == set(helpful.negative.openers) | set(harmless.positive.openers)
    assert own.few_shot == helpful.few_shot and own.positive.openers == helpful.positive.openers == []
    assert own.positive.system.text == helpful.positive.system.text
    assert own.negative.system.text == helpful.negative.system.text
    assert own.negative.max_new_tokens == helpful.negative.max_new_tokens == 0
    for name in ("quality_dpo", "demo_dpo"):
        cfg = load_config([f"config={PROJECT_ROOT / 'pipelines' / f'{name}.yaml'}"])
        assert cfg.pairs.contrast_helpful == "prompts/contrast/helpful_own_refusals.yaml"
        assert cfg.pairs.contrast_harmless == "prompts/contrast/harmless.yaml"
    for name in ("quality_sl", "demo_sl"):  # the SL-CAI models distill harmless.yaml's positive side
        cfg = load_config([f"config={PROJECT_ROOT / 'pipelines' / f'{name}.yaml'}"])
        assert (cfg.sft.data, cfg.sft.contrast_context) == ("contrast", "prompts/contrast/harmless.yaml")
