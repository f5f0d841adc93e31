"""feedback.source in multi-round RL and in DPO: human labels enter once, and DPO trains on the labels asked for."""

from __future__ import annotations

import json

import pytest

from cai.pipeline import main
from tests.conftest import ROOT, tiny_sl_run

HUMAN = ROOT / "prompts" / "human" / "example_labels.jsonl"


@pytest.fixture(scope="module")
def sl_run(tmp_path_factory):
    return tiny_sl_run(tmp_path_factory.mktemp("fsrc"), 2)


def common(root, const, stage="rl"):
    return [f"stage={stage}", "run=r", f"runs_dir={root / 'runs'}", f"constitution={const}",
            "pair_sampling.max_new_tokens=5", "red_team.limit=3", "helpful.limit=1", "feedback.labeler.model=tiny",
            "feedback.principles_per_pair=1", "progress=false", f"feedback.human_labels={HUMAN}"]


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_mixed_labels_over_two_rounds_enter_once(sl_run):
    root, const = sl_run
    main(common(root, const) + ["feedback.source=mixed", "rounds=2", "pm.batch_size=4", "pm.eval_fraction=0.25",
                                "ppo.steps=1", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2",
                                "ppo.ppo_epochs=1", "ppo.max_new_tokens=4"])
    rl = root / "runs" / "r" / "rl"
    r1, r2, everything = rows(rl / "round-1" / "comparisons.jsonl"), rows(rl / "round-2" / "comparisons.jsonl"), \
        rows(rl / "comparisons.jsonl")
    assert sum(c["source"] == "human" for c in r1) == 12  # every imported label, in round 1
    assert not any(c["source"] == "human" for c in r2)  # not again in round 2
    keys = [c["key"] for c in everything]
    assert len(keys) == len(set(keys)) == len(r1) + len(r2)
    s = json.loads((rl / "summary.json").read_text())
    assert s["rounds"][1]["pm"]["counts"]["comparisons"] == len(everything)


def test_dpo_trains_on_human_labels_when_asked(sl_run):
    root, const = sl_run
    main(common(root, const, "dpo") + ["feedback.source=human", "dpo.margin=0.1", "dpo.batch_size=4"])
    comps = rows(root / "runs" / "r" / "rl" / "dpo" / "comparisons.jsonl")
    assert len(comps) == 12 and all(c["source"] == "human" for c in comps)
    s = json.loads((root / "runs" / "r" / "rl" / "dpo" / "summary.json").read_text())
    assert s["dpo"]["pairs"] == sum(c["soft_label"] != 0.5 for c in comps)


def test_several_people_on_a_pair_combined_by_dawid_skene(sl_run, tmp_path):
    """human.combine=dawid_skene: three annotators on the same five pairs, one of them always wrong; DPO trains
    on one combined label per pair, which follows the two reliable annotators; the diagnostics give each
    annotator's reliability and their agreement."""
    root, const = sl_run
    truth = [1, 0, 1, 1, 0]
    labels = []
    for u, t in enumerate(truth):
        for ann, flip in (("ann", False), ("bea", u == 2), ("cy", True)):  # bea errs once, cy always
            choice = "a" if (t == 1) != flip else "b"
            labels.append({"prompt": f"Question {u}?", "answer_a": f"First answer {u}.", "answer_b": f"Second {u}.",
                           "choice": choice, "annotator": ann})
    path = tmp_path / "people.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in labels))
    args = common(root, const, "dpo") + ["feedback.source=human", f"feedback.human_labels={path}",
                                         "human.combine=dawid_skene", "dpo.margin=0.1", "dpo.batch_size=4",
                                         "run=people", f"policy.model={root / 'runs' / 'r' / 'sl' / 'model'}"]
    main(args)
    comps = rows(root / "runs" / "people" / "rl" / "dpo" / "comparisons.jsonl")
    assert len(comps) == 5 and all(c["annotator"] == "consensus:dawid_skene" for c in comps)
    assert [round(c["soft_label"]) for c in sorted(comps, key=lambda c: c["prompt"])] == truth
    h = json.loads((root / "runs" / "people" / "rl" / "dpo" / "summary.json").read_text())["labels"]["human_consensus"]
    assert h["annotators"]["cy"]["reliability"] < 0.2 < 0.8 < h["annotators"]["ann"]["reliability"]
    assert h["annotators"]["cy"]["agreement_with_consensus"] == 0.0
    assert h["agreement"]["units"] == 5 and h["pairs_with_several"] == 5
