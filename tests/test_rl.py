"""stage=rl and stage=dpo end to end on the tiny model: pairs, AI labels, PM, PPO / RLOO / GRPO / DPO, reuse."""

import json

import pytest

from cai.agreement import accuracy_weight, krippendorff_alpha
from cai.pipeline import main

from .conftest import tiny_sl_run


@pytest.fixture(scope="module")
def sl_run(tmp_path_factory):
    """A tiny SL-CAI model to start RL from (shared by the tests of this file)."""
    return tiny_sl_run(tmp_path_factory.mktemp("rl"), 2)


def rl_args(root, const, run="r", **over):
    args = {"stage": "rl", "run": run, "runs_dir": str(root / "runs"), "constitution": str(const),
            "pair_sampling.max_new_tokens": 6, "red_team.limit": 6, "helpful.limit": 2,
            "feedback.labeler.model": "tiny", "feedback.principles_per_pair": 2, "pm.batch_size": 4,
            "pm.eval_fraction": 0.25, "ppo.steps": 2, "ppo.rollout_batch_size": 4, "ppo.mini_batch_size": 2,
            "ppo.ppo_epochs": 1, "ppo.max_new_tokens": 6, "ppo.save_every": 1, "progress": False}
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def test_rl_stage_with_ppo_then_reuse(sl_run):
    root, const = sl_run
    main(rl_args(root, const))
    rl = root / "runs" / "r" / "rl"
    s = json.loads((rl / "summary.json").read_text())
    r1 = s["rounds"][0]
    assert r1["labels"]["pairs"] == 8 and r1["labels"]["scores_computed"] == 8 * 2 * 2
    comps = [json.loads(x) for x in (rl / "round-1" / "comparisons.jsonl").read_text().splitlines()]
    assert len(comps) == 8 and all(0 < c["soft_label"] < 1 and len(c["principles"]) == 2 for c in comps)
    assert (rl / "round-1" / "pm" / "model.safetensors").exists()
    assert (rl / "round-1" / "policy" / "model.safetensors").exists()
    diag = json.loads((rl / "round-1" / "label_diagnostics.json").read_text())
    assert set(diag) >= {"position_consistency", "mean_margin", "share_near_half", "human_agreement"}
    metrics = [json.loads(x) for x in (root / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any("rl/ppo/kl" in m for m in metrics) and any("rl/labels/position_consistency" in m for m in metrics)

    # rerun: every answer and score is reused, and the PM too
    main(rl_args(root, const))
    s = json.loads((rl / "summary.json").read_text())
    labels = s["rounds"][0]["labels"]
    assert labels["answers_generated"] == 0 and labels["scores_computed"] == 0
    assert s["rounds"][0]["pm"].get("reused") is True
    assert s["rounds"][0]["rl"].get("reused") is True  # the PPO policy is keyed too
    main(rl_args(root, const, **{"ppo.gradient_checkpointing": "true"}))  # memory only: the same model, reused
    assert json.loads((rl / "summary.json").read_text())["rounds"][0]["rl"].get("reused") is True

    # a different PPO setting trains a new policy (nothing stale is republished)
    main(rl_args(root, const, **{"ppo.learning_rate": 2e-5}))
    s = json.loads((rl / "summary.json").read_text())
    assert not s["rounds"][0]["rl"].get("reused") and s["rounds"][0]["rl"]["steps_run"] == 2


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_rl_stage_with_trl_group_algorithms(sl_run, algorithm):
    root, const = sl_run
    main(rl_args(root, const, run="r", algorithm=algorithm, **{
        f"{algorithm}.num_generations": 2, f"{algorithm}.batch_size": 4, f"{algorithm}.max_completion_length": 6}))
    s = json.loads((root / "runs" / "r" / "rl" / "summary.json").read_text())
    rl = s["rounds"][0]["rl"]
    assert rl["algorithm"] == algorithm and rl["steps"] >= 1 and rl["first_reward"] is not None


@pytest.mark.slow  # the longest tiny-model runs go to `make test-slow`
def test_group_rl_keeps_the_sl_cai_model_as_kl_anchor_over_rounds(sl_run, monkeypatch):
    """RLOO with rounds=2: round 2 starts from round 1's policy, but TRL's frozen reference must still be the
    SL-CAI weights (TRL builds it from the policy's own path, which drifted the anchor to each round's start)."""
    import torch
    import trl
    from safetensors.torch import load_file

    root, const = sl_run
    refs, starts = [], []
    original = trl.RLOOTrainer.train

    def recording(self, *a, **k):
        refs.append({n: p.detach().clone() for n, p in self.ref_model.named_parameters()})
        starts.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return original(self, *a, **k)

    monkeypatch.setattr(trl.RLOOTrainer, "train", recording)
    main(rl_args(root, const, run="anchor", rounds=2, algorithm="rloo", **{
        "rloo.num_generations": 2, "rloo.batch_size": 4, "rloo.max_completion_length": 6,
        "rloo.learning_rate": 1e-3, "policy.model": str(root / "runs" / "r" / "sl" / "model")}))
    sl = load_file(root / "runs" / "r" / "sl" / "model" / "model.safetensors")
    assert len(refs) == 2
    for ref in refs:
        shared = [n for n in ref if n in sl]
        assert len(shared) >= len(sl) - 1  # every weight (a tied lm_head may be stored once)
        assert all(torch.equal(ref[n], sl[n].to(ref[n].dtype)) for n in shared)
    # and round 2 did start from another model, so the check above could fail
    assert any(not torch.equal(starts[1][n], sl[n].to(starts[1][n].dtype)) for n in starts[1] if n in sl)


def test_two_rounds_of_online_rlaif(sl_run):
    root, const = sl_run
    main(rl_args(root, const, rounds=2, **{"ppo.ptx_coef": 0.1}))  # with PPO-ptx on the SL data
    rl = root / "runs" / "r" / "rl"
    s = json.loads((rl / "summary.json").read_text())
    assert [r["round"] for r in s["rounds"]] == [1, 2]
    # round 2 samples from round 1's policy: new answers, and its PM trains on both rounds' comparisons
    assert s["rounds"][1]["labels"]["answers_generated"] == 16
    assert s["rounds"][1]["pm"]["counts"]["comparisons"] == 16
    assert (rl / "round-2" / "policy" / "model.safetensors").exists()
    metrics = [json.loads(x) for x in (root / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("rl/ppo/ptx_loss", 0) > 0 for m in metrics)


def dpo_args(root, const, run="r"):
    return ["stage=dpo", f"run={run}", f"runs_dir={root / 'runs'}", f"constitution={const}",
            "pair_sampling.max_new_tokens=6", "red_team.limit=6", "helpful.limit=2", "feedback.labeler.model=tiny",
            "feedback.principles_per_pair=2", "dpo.margin=0.0", "dpo.batch_size=4", "progress=false"]


def test_dpo_stage(sl_run, capsys):
    root, const = sl_run
    main(dpo_args(root, const))
    s = json.loads((root / "runs" / "r" / "rl" / "dpo" / "summary.json").read_text())
    assert s["dpo"]["pairs"] == 8 and s["dpo"]["steps"] == 2
    assert (root / "runs" / "r" / "rl" / "dpo" / "policy" / "model.safetensors").exists()
    # the implicit reward on the bundled clear pairs (none of them a prompt this run trained on)
    clear = s["dpo"]["clear_pairs"]
    assert clear["count"] + clear["left_out"] == 80 and 0 <= clear["accuracy"] <= 1
    assert set(clear["by_category"]) == {"harmless", "helpful"}
    assert set(clear["by_length"]) == {"better_longer", "better_shorter"}
    assert "implicit reward beta*log(pi/pi_ref) on clear pairs" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["dpo", "rl"])
def test_clear_pairs_are_checked_before_any_work(sl_run, tmp_path, capsys, stage):
    root, const = sl_run
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"id": "x", "category": "rude", "prompt": "p", "better": "b", "worse": "w"}) + "\n")
    steps = root / "runs" / "r" / "rl" / "steps.jsonl"
    before = steps.read_bytes() if steps.exists() else None
    args = dpo_args(root, const) if stage == "dpo" else rl_args(root, const)
    with pytest.raises(SystemExit) as e:
        main(args + [f"{'dpo' if stage == 'dpo' else 'pm'}.clear_pairs={bad}", "red_team.limit=7"])  # new pairs
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pairs.jsonl:1" in err[0] and "harmless or helpful" in err[0]
    assert (steps.read_bytes() if steps.exists() else None) == before


@pytest.mark.parametrize("override", ["feedback.principles_per_pair=0", "pair_sampling.top_p=0", "rounds=0",
                                      "algorithm=none rounds=2", "red_team.limit=-1", "ppo.value_init=pmx"])
def test_bad_rl_settings_exit_2_before_any_work(sl_run, override, capsys):
    root, const = sl_run
    with pytest.raises(SystemExit) as e:
        main(rl_args(root, const, run="bad") + override.split())
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (root / "runs" / "bad" / "rl" / "steps.jsonl").exists()


def test_rl_needs_an_sl_model(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["stage=rl", "run=none", f"runs_dir={tmp_path}", "feedback.labeler.model=tiny"])
    assert e.value.code == 2


def test_dpo_pairs_drop_near_half():
    from cai.train.dpo import preference_pairs  # heavy (imports torch)

    comps = [{"prompt": "q", "answer_a": "x", "answer_b": "y", "soft_label": p} for p in (0.9, 0.55, 0.2, 0.5)]
    pairs = preference_pairs(comps, margin=0.1)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("x", "y"), ("y", "x")]


def test_killed_rl_run_resumes_labels_and_ppo(sl_run):
    """SIGKILL during labeling and during PPO; the rerun reuses what was stored, resumes PPO from its checkpoint,
    and ends with exactly the comparisons of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    root, const = sl_run
    policy = f"policy.model={root / 'runs' / 'r' / 'sl' / 'model'}"
    over = {"ppo.steps": 4, "red_team.limit": 8}
    main(rl_args(root, const, run="ref", **over) + [policy])
    args = rl_args(root, const, run="killed", **over) + [policy]
    rl = root / "runs" / "killed" / "rl"

    def run_until(condition):
        proc = subprocess.Popen([sys.executable, "-m", "cai.pipeline", *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if condition():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        return proc.wait()

    steps = rl / "steps.jsonl"
    # 20 answers, then 40 scores: kill in the middle of the labels
    assert run_until(lambda: steps.exists() and steps.read_bytes().count(b"\n") >= 26) == -signal.SIGKILL
    assert run_until(lambda: list((rl / "round-1" / "ppo").glob("*/checkpoints/step-2"))) == -signal.SIGKILL
    main(args)
    s = json.loads((rl / "summary.json").read_text())
    labels, ppo = s["rounds"][0]["labels"], s["rounds"][0]["rl"]
    assert labels["answers_generated"] == 0 and labels["scores_computed"] == 0  # all stored before the PPO kill
    assert ppo["resumed_from"] and ppo["resumed_from"].endswith("step-2") and ppo["steps_run"] == 2
    keys = [json.loads(x)["key"] for x in steps.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 20 + 40
    ref = (root / "runs" / "ref" / "rl" / "comparisons.jsonl").read_text()
    assert (rl / "comparisons.jsonl").read_text() == ref


@pytest.mark.slow
def test_rl_on_the_bundled_model(tmp_path):
    """stage=rl with SmolLM2 as policy and labeler, one PPO step: the real-model path end to end."""
    main(["stage=rl", "run=slow", f"runs_dir={tmp_path}", "policy.model=smollm2-135m", "red_team.limit=4",
          "helpful.limit=2", "pair_sampling.max_new_tokens=16", "feedback.principles_per_pair=2", "pm.batch_size=4",
          "pm.eval_fraction=0.34", "ppo.steps=1", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2",
          "ppo.ppo_epochs=1", "ppo.max_new_tokens=8", "progress=false"])
    s = json.loads((tmp_path / "slow" / "rl" / "summary.json").read_text())
    r = s["rounds"][0]
    assert r["labels"]["pairs"] == 6 and r["rl"]["steps"] == 1
    comps = [json.loads(x) for x in (tmp_path / "slow" / "rl" / "comparisons.jsonl").read_text().splitlines()]
    # a real labeler puts nearly all its mass on the two letters: each order's P(A) is a real probability
    assert all(0.0 < p["p_a_first"] < 1.0 for c in comps for p in c["principles"])


def test_rlhf_human_labels_and_mixed_sources(sl_run, tmp_path):
    """feedback.source=human trains the PM on imported labels; mixed replaces AI labels where humans labeled."""
    root, const = sl_run
    policy = f"policy.model={root / 'runs' / 'r' / 'sl' / 'model'}"
    # first an AI-labeled run, to have real pairs for humans to label
    main(rl_args(root, const, run="ai", algorithm="none") + [policy])
    ai = [json.loads(x) for x in (root / "runs" / "ai" / "rl" / "comparisons.jsonl").read_text().splitlines()]
    human_file = tmp_path / "labels.jsonl"
    rows = [{"prompt": c["prompt"], "answer_a": c["answer_b"], "answer_b": c["answer_a"],  # shown swapped
             "choice": "a", "annotator": "ann-1"} for c in ai[:3]]
    human_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    main(rl_args(root, const, run="hf", algorithm="none", **{"feedback.source": "human",
                                                            "feedback.human_labels": human_file}) + [policy])
    s = json.loads((root / "runs" / "hf" / "rl" / "summary.json").read_text())
    assert s["rounds"][0]["labels"]["pairs"] == 3 and s["rounds"][0]["pm"]["counts"]["comparisons"] == 3
    assert not (root / "runs" / "hf" / "rl" / "steps.jsonl").exists()  # nothing sampled or labeled by a model

    main(rl_args(root, const, run="mixed", algorithm="none", **{"feedback.source": "mixed",
                                                               "feedback.human_labels": human_file}) + [policy])
    s = json.loads((root / "runs" / "mixed" / "rl" / "summary.json").read_text())
    labels = s["rounds"][0]["labels"]
    assert labels["human_used"] == 3 and labels["human_shared"] == 3  # AI-vs-human agreement on the shared pairs
    comps = [json.loads(x) for x in (root / "runs" / "mixed" / "rl" / "comparisons.jsonl").read_text().splitlines()]
    assert sum(c["source"] == "human" for c in comps) == 3 and sum(c["source"] == "ai" for c in comps) == len(ai) - 3


def test_several_labelers_consensus_and_agreement(sl_run, tmp_path):
    """feedback.labelers: the tiny model and the SL model label every pair; adding a labeler labels only with
    the new one; the soft label is the accuracy-weighted mean; diagnostics give each labeler's clear-pair
    accuracy and their agreement."""
    from .conftest import ROOT

    root, const = sl_run
    clear = tmp_path / "clear.jsonl"
    clear.write_text("".join((ROOT / "prompts/sets/labeled_pairs.jsonl").read_text().splitlines(True)[:6]))
    sl_model = root / "runs" / "r" / "sl" / "model"
    base = rl_args(root, const, run="cons", algorithm="none", **{"red_team.limit": 3, "helpful.limit": 1,
                                                                 "policy.model": sl_model})
    main(base)  # one labeler: feedback.labeler
    rl = root / "runs" / "cons" / "rl"
    single = [json.loads(x) for x in (rl / "round-1" / "comparisons.jsonl").read_text().splitlines()]
    assert len(single) == 4
    labelers = f"feedback.labelers=[{{model: tiny}}, {{model: {sl_model}}}]"
    main(base + [labelers, "feedback.combine=accuracy_weighted", f"feedback.clear_pairs={clear}"])
    s = json.loads((rl / "summary.json").read_text())["rounds"][0]["labels"]
    # the tiny labeler's 4 pairs x 2 principles x 2 orders are reused; new: the SL model's 16 and 6 clear pairs x 4
    # for each labeler
    assert s["scores_reused"] == 16 and s["scores_computed"] == 16 + 2 * 6 * 4
    cons = s["consensus"]
    assert [d["labeler"] for d in cons["labelers"]] == ["feedback.labelers[0]", "feedback.labelers[1]"]
    for d in cons["labelers"]:
        assert d["clear_count"] == 6 and 0 <= d["clear_accuracy"] <= 1 and 0 <= d["position_consistency"] <= 1
        assert d["weight"] == pytest.approx(accuracy_weight(d["clear_accuracy"] * 6, 6))
    comps = [json.loads(x) for x in (rl / "round-1" / "comparisons.jsonl").read_text().splitlines()]
    by_pair = {c["pair_key"]: c for c in single}
    w = [d["weight"] for d in cons["labelers"]]
    rows = []
    for c in comps:
        labels = [x["soft_label"] for x in c["labelers"]]
        assert labels[0] == by_pair[c["pair_key"]]["soft_label"]  # the tiny labeler's label, as in the single run
        expected = sum(a * b for a, b in zip(w, labels)) / sum(w) if sum(w) > 0 else sum(labels) / 2
        assert c["soft_label"] == pytest.approx(expected) and c["annotator"] == "consensus"
        rows.append(labels)
    a = cons["agreement"]
    assert a["units"] == 4 and a["alpha_interval"] == pytest.approx(krippendorff_alpha(rows, "interval"))
    assert set(a) >= {"pairwise_agreement", "fleiss_kappa", "alpha_nominal"}
    main(base + [labelers, "feedback.combine=accuracy_weighted", f"feedback.clear_pairs={clear}"])
    s = json.loads((rl / "summary.json").read_text())["rounds"][0]["labels"]
    assert s["scores_computed"] == 0
