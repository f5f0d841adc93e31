"""cai.compare on two tiny runs: report numbers checked against hand computations from the raw records, reuse
on a rerun, bad input; unit tests of the Bradley-Terry/Elo fit and the boilerplate detector on hand-made data."""

import importlib.util
import json
import math
import re
import shutil

import numpy as np
import pytest

from cai.compare import boilerplate, bradley_terry, elo_from_theta, elo_with_ci, main
from cai.config import stable_hash
from cai.pipeline import main as pipeline

from .conftest import ASSETS, ROOT

ELO = 400 / math.log(10)


# --- maths on hand-made inputs -----------------------------------------------------------------------------


def test_two_models_elo_gap_is_the_log_odds_of_the_win_rate():
    for p in (0.75, 0.6, 0.1):
        wins = np.array([[0, 4 * p], [4 * (1 - p), 0]])
        elo = elo_from_theta(bradley_terry(wins, np.array([[0, 4.0], [4.0, 0]])))
        assert elo[0] - elo[1] == pytest.approx(400 * math.log10(p / (1 - p)), abs=1e-3)
        assert elo.mean() == pytest.approx(1000)


def test_bt_recovers_strengths_from_exact_outcomes():
    theta = np.array([0.0, 1.0, 2.0])
    p = 1 / (1 + np.exp(-(theta[:, None] - theta[None, :])))
    counts = 3.0 * (1 - np.eye(3))
    elo = elo_from_theta(bradley_terry(p * counts, counts))
    assert elo[1] - elo[0] == pytest.approx(ELO, abs=1e-3) and elo[2] - elo[1] == pytest.approx(ELO, abs=1e-3)
    assert ELO == pytest.approx(173.7178, abs=1e-4)


def test_bt_stays_finite_when_one_model_wins_everything():
    theta = bradley_terry(np.array([[0, 5.0], [0, 0]]), np.array([[0, 5.0], [5.0, 0]]))
    assert np.isfinite(theta).all() and theta[0] > theta[1] + 5


def test_bootstrap_interval_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(1)
    outcomes = rng.uniform(0.2, 0.8, size=(12, 3, 3))
    outcomes[:, 0, 1] += 0.15  # model 0 a little better than 1
    for i in range(3):
        for j in range(i):
            outcomes[:, i, j] = 1 - outcomes[:, j, i]
    a, b, c = elo_with_ci(outcomes, 200, 7), elo_with_ci(outcomes, 200, 7), elo_with_ci(outcomes, 200, 8)
    assert (a["ci_low"] == b["ci_low"]).all() and (a["ci_high"] == b["ci_high"]).all()
    assert not (a["ci_low"] == c["ci_low"]).all()
    assert (a["ci_low"] <= a["elo"]).all() and (a["elo"] <= a["ci_high"]).all()
    assert elo_with_ci(outcomes, 0, 7)["ci_low"] is None


def test_boilerplate_phrase_and_share():
    answers = ["I am sorry, but I cannot help.", "Sure. I am SORRY but I can't do that.",
               "Mix the flour and the butter.", "i am sorry but no", "short"]
    b = boilerplate(answers, n=4)
    assert b == {"phrase": "i am sorry but", "answers_with_phrase": 3, "answers": 5, "share": 0.6}
    # ties go to the alphabetically first phrase; a phrase in one answer only is not boilerplate
    assert boilerplate(["b b x", "b b y", "a a x", "a a y"], n=2)["phrase"] == "a a"
    assert boilerplate(["one two three", "four five six"], n=2) == {"phrase": None, "answers_with_phrase": 0,
                                                                    "answers": 2, "share": 0.0}


# --- two tiny runs ---------------------------------------------------------------------------------------------


def _rl(root, run, const, **over):
    args = {"stage": "rl", "run": run, "runs_dir": str(root / "runs"), "constitution": str(const),
            "pair_sampling.max_new_tokens": 6, "red_team.limit": 6, "helpful.limit": 2,
            "feedback.labeler.model": "tiny", "pm.batch_size": 4, "pm.eval_fraction": 0.5, "ppo.steps": 2,
            "ppo.rollout_batch_size": 4, "ppo.mini_batch_size": 2, "ppo.ppo_epochs": 1, "ppo.max_new_tokens": 6,
            "progress": False, **over}
    pipeline([f"{k}={v}" for k, v in args.items()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: SL-CAI then RL (seed 0). B: RL from A's SL-CAI model with another seed and constitution, plus human
    labels on four of its pairs (two shown in the other order) that are compared with its AI labels."""
    root = tmp_path_factory.mktemp("compare")
    const_a, const_b = root / "a.yaml", root / "b.yaml"
    shutil.copyfile(ASSETS / "constitutions" / "good.yaml", const_a)
    shutil.copyfile(ASSETS / "constitutions" / "good_flow.yaml", const_b)
    pipeline(["stage=sl", "run=A", f"runs_dir={root / 'runs'}", f"constitution={const_a}", "generator.model=tiny",
              "red_team.limit=2", "critique.rounds=1", "critique.few_shot=0", "sampling.max_new_tokens=4",
              "sft.helpful_ratio=0.5", "sft.batch_size=4", "progress=false"])
    _rl(root, "A", const_a, **{"feedback.principles_per_pair": 2})
    b_args = {"seed": 1, "policy.model": root / "runs" / "A" / "sl" / "model", "feedback.principles_per_pair": 1}
    _rl(root, "B", const_b, **b_args)
    comps = [json.loads(x) for x in (root / "runs" / "B" / "rl" / "round-1" / "comparisons.jsonl").read_text().splitlines()]
    human = []
    for i, c in enumerate(comps[:4]):
        a, b = (c["answer_b"], c["answer_a"]) if i % 2 else (c["answer_a"], c["answer_b"])
        human.append({"prompt": c["prompt"], "answer_a": a, "answer_b": b, "choice": "a" if i < 3 else "b",
                      "annotator": "ann"})
    labels = root / "human.jsonl"
    labels.write_text("".join(json.dumps(h) + "\n" for h in human))
    _rl(root, "B", const_b, **b_args, **{"feedback.human_labels": labels})  # everything reused; agreement measured
    patterns = root / "refusal.txt"  # a pattern random text matches now and then, so refusal rates are not all 0
    patterns.write_text("# test pattern\n\\bs[a-z]\n")
    return root, patterns


def _compare(root, patterns, out, *extra):
    main([str(root / "runs" / "A"), str(root / "runs" / "B"), "judge.model=tiny", "red_team.limit=3",
          "helpful.limit=3", "sampling.max_new_tokens=8", "sampling.temperature=1.0", "bootstrap=200",
          f"refusal_patterns={patterns}", f"out={out}", "progress=false", "clear_limit=4", *extra])
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def report(runs):
    root, patterns = runs
    out = root / "report"
    return root, out, _compare(root, patterns, out)


def _records(out):
    return {r["key"]: r for r in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}


def test_models_found_and_deduplicated(report):
    _, _, rep = report
    # B's RL started from A's SL model: compared once, named by its kind; B's base is that run's base
    assert [m["label"] for m in rep["models"]] == ["base", "sl", "A/rl", "B/rl"]
    assert rep["models"][0]["aliases"] == ["A/base", "B/base"]
    assert rep["models"][1]["aliases"] == ["A/sl", "B/sl"]
    assert not any("no base model" in n for n in rep["notes"])


def test_win_rates_elo_refusals_lengths_and_pm_scores_by_hand(report, runs):
    root, out, rep = report
    recs = _records(out)
    labels = [m["label"] for m in rep["models"]]
    patterns = [re.compile(line, re.IGNORECASE) for line in runs[1].read_text().splitlines()
                if line and not line.startswith("#")]
    refusal_rates = []
    for s in ("red_team", "helpful"):
        answers = rep["records"]["answers"][s]
        outcomes: dict = {}
        for j in rep["records"]["judge"][s]:
            xf, yf = recs[j["x_first"]], recs[j["y_first"]]
            ax, ay = recs[answers[j["x"]][j["k"]]]["text"], recs[answers[j["y"]][j["k"]]]["text"]
            # the judge saw x's answer first in one request and second in the other
            assert (xf["first_sha"], xf["second_sha"]) == (stable_hash(ax), stable_hash(ay))
            assert (yf["first_sha"], yf["second_sha"]) == (stable_hash(ay), stable_hash(ax))
            for r in (xf, yf):  # option-letter probabilities normalized over A and B
                la, lb = r["logp"]
                assert r["p_option_a"] == pytest.approx(math.exp(la) / (math.exp(la) + math.exp(lb)))
            p = (xf["p_option_a"] + (1 - yf["p_option_a"])) / 2  # both orders averaged
            outcomes.setdefault((j["x"], j["y"]), []).append(p)
            outcomes.setdefault((j["y"], j["x"]), []).append(1 - p)
        assert len(outcomes) == 4 * 3 and all(len(v) == 3 for v in outcomes.values())
        for (x, y), ps in outcomes.items():
            assert rep["win_rates"][s][x][y] == pytest.approx(sum(ps) / len(ps), abs=1e-12)

        # Elo by an independent fit: Hunter's MM iteration on the summed soft wins
        wins = {x: sum(sum(outcomes[(x, y)]) for y in labels if y != x) for x in labels}
        gamma = {x: 1.0 for x in labels}
        for _ in range(2000):
            gamma = {x: wins[x] / sum(3 / (gamma[x] + gamma[y]) for y in labels if y != x) for x in labels}
        logs = {x: math.log(g) for x, g in gamma.items()}
        mean_log = sum(logs.values()) / len(logs)
        for x in labels:
            e = rep["elo"][s][x]
            assert e["elo"] == pytest.approx(1000 + ELO * (logs[x] - mean_log), abs=1e-3)
            assert e["ci_low"] <= e["elo"] <= e["ci_high"]

        for x in labels:
            texts = [recs[k]["text"] for k in answers[x]]
            tokens = [recs[k]["completion_tokens"] for k in answers[x]]
            rate = sum(any(p.search(t) for p in patterns) for t in texts) / len(texts)
            refusal_rates.append(rate)
            assert rep["answers"][s][x]["refusal_rate"] == pytest.approx(rate)
            assert rep["answers"][s][x]["mean_tokens"] == pytest.approx(sum(tokens) / len(tokens))
            for pm, per_set in rep["records"]["pm_scores"].items():
                scores = [recs[k]["score"] for k in per_set[s][x]]
                assert rep["pm_scores"][pm][s][x] == pytest.approx(sum(scores) / len(scores))
    assert any(0 < r < 1 for r in refusal_rates)  # the refusal check is not vacuous
    assert set(rep["pm_scores"]) == {"A/pm", "B/pm"}


def test_a_pm_score_matches_scoring_the_answer_directly(report):
    from cai.train.pm import load_pm, score_answers

    root, out, rep = report
    recs = _records(out)
    key = rep["records"]["answers"]["helpful"]["B/rl"][0]
    model, tok = load_pm(root / "runs" / "B" / "rl" / "round-1" / "pm")
    prompt = json.loads((ROOT / "prompts" / "sets" / "helpful_eval.jsonl").read_text().splitlines()[0])["prompt"]
    [score] = score_answers(model, tok, [prompt], [recs[key]["text"]])
    assert recs[rep["records"]["pm_scores"]["B/pm"]["helpful"]["B/rl"][0]]["score"] == pytest.approx(score, abs=1e-3)


def test_run_records_curves_labels_cost_and_diffs(report):
    root, _, rep = report
    metrics = [json.loads(x) for x in (root / "runs" / "A" / "metrics.jsonl").read_text().splitlines()]
    ppo = [m for m in metrics if "rl/ppo/reward_mean" in m]
    assert rep["curves"]["A"] == [{"algorithm": "ppo", "steps": [m["step"] for m in ppo],
                                   "reward": [m["rl/ppo/reward_mean"] for m in ppo], "kl": [m["rl/ppo/kl"] for m in ppo]}]
    assert len(rep["curves"]["B"]) == 1 and len(rep["curves"]["B"][0]["steps"]) == 2  # the rerun trained nothing

    # AI vs human on B's shared pairs, by hand (two of the human records show the pair in the other order)
    b_dir = root / "runs" / "B"
    ai = {tuple(sorted([c["answer_a"], c["answer_b"]])): c
          for c in map(json.loads, (b_dir / "rl" / "comparisons.jsonl").read_text().splitlines())}
    human = [json.loads(x) for x in (root / "human.jsonl").read_text().splitlines()]
    agree = 0
    for h in human:
        c = ai[tuple(sorted([h["answer_a"], h["answer_b"]]))]
        ai_prefers_h_a = (c["soft_label"] > 0.5) == (c["answer_a"] == h["answer_a"])
        agree += ai_prefers_h_a == (h["choice"] == "a")
    lab = rep["labels"]["B"]
    assert lab["human_labels"] == 4 and lab["human_shared"] == 4
    assert lab["human_agreement"] == pytest.approx(agree / 4)
    diag = json.loads((b_dir / "rl" / "round-1" / "label_diagnostics.json").read_text())
    assert lab["rounds"][0]["position_consistency"] == diag["position_consistency"]
    assert diag["human_agreement"] == pytest.approx(agree / 4)  # the RL stage's own count agrees
    assert sum(b["count"] for b in lab["ai_vs_human_calibration"]) == 4
    assert rep["labels"]["A"]["human_labels"] == 0 and rep["labels"]["A"]["pm_heldout_calibration"]
    assert rep["cost"]["runs"]["B"][0]["seconds_per_label"] == diag["seconds_per_label"]
    assert rep["cost"]["judge"]["labels"] == 2 * 6 * 6 and rep["cost"]["judge"]["tokens_per_label"] > 50

    diffs = rep["config_diff"]["B vs A"]
    assert "\n-seed: 0\n" in diffs["config.rl.yaml"] and "\n+seed: 1\n" in diffs["config.rl.yaml"] and "test-flow" in diffs["constitution.yaml"]
    assert diffs["config.sl.yaml"].count("\n-") > 10  # B has no SL config: every line is removed


def test_report_files_embed_the_plots(report):
    _, out, rep = report
    assert set(rep["plots"]) == {"plots/elo.png", "plots/win_rates.png", "plots/answers.png",
                                 "plots/rl_curves.png", "plots/calibration.png"}
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for p in rep["plots"]:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({p})" in md
    assert page.count('src="data:image/png;base64,') == len(rep["plots"]) and "plots/" not in page
    assert "&quot;test-flow&quot;" in page  # run text is escaped
    e = rep["elo"]["red_team"]["B/rl"]
    assert f"{e['elo']:.1f} [{e['ci_low']:.1f}, {e['ci_high']:.1f}]" in md


def test_rerun_computes_nothing_and_repeats_the_numbers(report, runs):
    root, out, rep = report
    before = (out / "steps.jsonl").read_bytes()
    again = _compare(root, runs[1], out)
    assert (out / "steps.jsonl").read_bytes() == before
    assert all(again["work"][k]["computed"] == 0 for k in ("answers", "judge", "pm_scores"))
    assert again["work"]["answers"]["reused"] == 4 * 6 and again["work"]["judge"]["reused"] == 2 * 6 * 6
    assert again["elo"] == rep["elo"] and again["win_rates"] == rep["win_rates"]  # seeded bootstrap
    assert not list((out / "plans").glob("*.json"))


@pytest.mark.parametrize("case", ["one run", "not a run", "missing", "twice", "bad key"])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, case):
    root, _ = runs
    a = str(root / "runs" / "A")
    argv = {"one run": [a], "not a run": [a, str(tmp_path)], "missing": [a, str(tmp_path / "nope")],
            "twice": [a, a], "bad key": [a, str(root / "runs" / "B"), "bootstrapp=3"]}[case]
    with pytest.raises(SystemExit) as e:
        main(argv + ["judge.model=tiny", f"out={tmp_path / 'out'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert {"one run": "expected 2 or more", "not a run": "not a run directory", "missing": "no such directory",
            "twice": "given twice", "bad key": "did you mean 'bootstrap'"}[case] in err
    assert not (tmp_path / "out").exists()


def _vllm_runs(tmp_path):
    """Two run directories (configs only): A generated with backend=vllm, B with transformers."""
    for name, backend in (("A", "vllm"), ("B", "transformers")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.sl.yaml").write_text(
            f"stage: sl\ngenerator:\n  model: tiny\n  backend: {backend}\n  gpu_memory_utilization: 0.5\n")
    return [str(tmp_path / "A"), str(tmp_path / "B")]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
@pytest.mark.parametrize("case", ["run", "judge"])
def test_vllm_runs_and_judge_need_the_extra_one_line_before_work(tmp_path, capsys, case):
    """A run generated with backend=vllm (or judge.backend=vllm) was refused as an unknown backend; now it is
    compared with vLLM, and where vLLM is missing the one line says so (exit 2, nothing written)."""
    a, b = _vllm_runs(tmp_path)
    argv = [a, b] if case == "run" else [b, str(tmp_path / "B2"), "judge.backend=vllm"]
    if case == "judge":
        shutil.copytree(tmp_path / "B", tmp_path / "B2")
    with pytest.raises(SystemExit) as e:
        main(argv + ["judge.model=tiny", f"out={tmp_path / 'out'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    where = f"{tmp_path / 'A' / 'config.sl.yaml'}: generator.backend=vllm" if case == "run" else "judge.backend=vllm"
    assert f"{where} needs the vllm package" in err, err
    assert not (tmp_path / "out").exists()


def test_a_vllm_run_is_compared_with_vllm_and_its_settings(tmp_path, monkeypatch):
    """Where vLLM can run: the run's model is a vLLM contender, keyed by the identity the vLLM backend reports,
    built with the run's vLLM settings (the engine itself needs a GPU: tests/test_vllm_backend.py)."""
    import cai.compare as compare
    from cai.backends.vllm_backend import vllm_identity
    from cai.config import CompareConfig
    from cai.models import resolve_model

    monkeypatch.setattr(compare, "require_vllm", lambda what: None)
    a, b = _vllm_runs(tmp_path)
    models, _ = compare.contenders(compare.load_runs([a, b]), CompareConfig())
    vllm = [m for m in models if m.spec["backend"] == "vllm"]
    assert len(vllm) == 1 and vllm[0].aliases == ["A/base"]
    assert vllm[0].identity == vllm_identity(resolve_model("tiny"), "auto") != models[1].identity
    assert vllm[0].spec["gpu_memory_utilization"] == 0.5 and vllm[0].spec["enable_prefix_caching"] is True


def test_one_judge_that_labeled_both_runs_is_flagged(report):
    _, _, rep = report
    jr = rep["judges"]
    assert jr["judges"]["judge"]["labeler_of"] == ["A", "B"]  # both runs were labeled by the tiny model
    assert jr["self_preference"][0]["judge"] == "judge"
    assert jr["without_self_preference"] == {"judges": [], "results": None}
    assert jr["judges"]["judge"]["clear_pairs"]["count"] == 4 and jr["agreement"] == {}


def test_several_judges_self_preference_agreement_and_clear_pairs(runs, report):
    """judges=[tiny (labeler of both runs), A's SL model (labeler of none)]: the mean outcome, the results
    without the self-preferring judge (the SL judge's own), agreement and clear-pair accuracy, by hand."""
    from cai.agreement import krippendorff_alpha, pairwise_agreement
    from cai.prompts import load_labeled_set

    root, patterns = runs
    _, first_out, first = report
    out = root / "report-judges"
    shutil.copytree(first_out, out)  # the tiny judge's scores and the answers are reused
    sl = root / "runs" / "A" / "sl" / "model"
    rep = _compare(root, patterns, out, f"judges=[{{model: tiny}}, {{model: {sl}}}]", "disagreements=3")
    assert rep["work"]["answers"]["computed"] == 0
    assert rep["work"]["judge"]["reused"] == 2 * 6 * 6 and rep["work"]["judge"]["computed"] == 2 * 6 * 6
    recs = _records(out)
    labels = [m["label"] for m in rep["models"]]
    jr = rep["judges"]
    assert [x["judge"] for x in jr["self_preference"]] == ["judges[0]"] and jr["judges"]["judges[1]"]["labeler_of"] == []
    for s in ("red_team", "helpful"):
        own: dict = {}
        for name, index in rep["records"]["judges"].items():
            for j in index[s]:
                p = (recs[j["x_first"]]["p_option_a"] + 1 - recs[j["y_first"]]["p_option_a"]) / 2
                own.setdefault(name, {})[(j["k"], j["x"], j["y"])] = p
        assert rep["records"]["judges"]["judges[0]"] == first["records"]["judge"]
        for (k, x, y), p1 in own["judges[1]"].items():
            p0 = own["judges[0]"][(k, x, y)]
            assert rep["win_rates"][s][x][y] == pytest.approx(sum((own["judges[0]"][(kk, xx, yy)] + q) / 2
                                                                  for (kk, xx, yy), q in own["judges[1]"].items()
                                                                  if (xx, yy) == (x, y)) / 3)
            assert 0 <= p0 <= 1 and 0 <= p1 <= 1
        without = jr["without_self_preference"]["results"][s]
        for x in labels:
            for y in labels:
                if x != y:
                    mine = [q if xx == x else 1 - q for (kk, xx, yy), q in own["judges[1]"].items() if {xx, yy} == {x, y}]
                    assert without["win_rates"][x][y] == pytest.approx(sum(mine) / 3)
        keys = [(k, x, y) for (k, x, y) in own["judges[0]"]
                if next(j for j in rep["records"]["judge"][s] if (j["k"], j["x"], j["y"]) == (k, x, y))["x_first"]
                != next(j for j in rep["records"]["judge"][s] if (j["k"], j["x"], j["y"]) == (k, x, y))["y_first"]]
        rows = [[own["judges[0]"][u], own["judges[1]"][u]] for u in keys]
        a = jr["agreement"][s]
        assert a["units"] == len(rows)
        assert a["alpha_interval"] == pytest.approx(krippendorff_alpha(rows, "interval"))
        hard = [[None if v == 0.5 else int(v > 0.5) for v in r] for r in rows]
        assert a["pairwise_agreement"]["mean"] == pytest.approx(pairwise_agreement(hard)["mean"])
    spreads = [d["spread"] for d in jr["disagreements"]]
    assert len(spreads) == 3 and spreads == sorted(spreads, reverse=True)
    # clear-pair accuracy of each judge, from its records
    for name, index in rep["records"]["clear_pairs"].items():
        clear = load_labeled_set("prompts/sets/labeled_pairs.jsonl")[:4]  # harmless and helpful interleaved
        by_key = {stable_hash(["clear-pair", r["prompt"], r["better"], r["worse"]]): r for r in clear}
        right = 0.0
        for c in index:
            p = (recs[c["a_first"]]["p_option_a"] + 1 - recs[c["b_first"]]["p_option_a"]) / 2
            r = by_key[c["pair_key"]]
            better_is_a = int(c["pair_key"], 16) % 2 == 1
            assert recs[c["a_first"]]["first_sha"] == stable_hash(r["better"] if better_is_a else r["worse"])
            right += 0.5 if p == 0.5 else float((p > 0.5) == better_is_a)
        assert jr["judges"][name]["clear_pairs"]["accuracy"] == pytest.approx(right / 4)
    md = (out / "report.md").read_text()
    assert "Self-preference: judge judges[0]" in md and "Without self-preference (judges judges[1] only)" in md


def test_label_report_shows_evaluators_per_run_and_flags_disagreements(tmp_path):
    """Per run: each AI labeler's diagnostics, the annotators' reliability, agreement, and the pairs where the
    evaluators disagree most (largest spread), from what stage=rl saved."""
    from cai.agreement import agreement_report
    from cai.compare import Run, label_report
    from cai.feedback import consensus
    from cai.human import combine_human
    from cai.records import human_comparison
    from cai.report import evaluator_blocks

    def comp(i, name, p):
        return {"key": f"{name}-{i}", "pair_key": f"pair-{i}", "prompt_id": f"p{i}", "prompt": f"Q{i}",
                "category": "", "answer_a": f"a{i}", "answer_b": f"b{i}", "source": "ai", "annotator": name,
                "soft_label": p, "agree": True, "principles": [{"p_a_first": p, "p_a_swapped": 1 - p}], "cot": False}

    x, y = [0.9, 0.2, 0.6, 0.5], [0.8, 0.9, 0.4, 0.5]  # pair 1: spread 0.7, pair 2: 0.2, pair 0: 0.1
    per = [("l0", [comp(i, "l0", p) for i, p in enumerate(x)]), ("l1", [comp(i, "l1", p) for i, p in enumerate(y)])]
    comps = consensus(per, [1.0, 1.0], "mean")
    people = [human_comparison("Q0", "p0", "", "a0", "b0", "ann", 1.0), human_comparison("Q0", "p0", "", "a0", "b0", "bo", 0.0)]
    _, human_report = combine_human(people, "majority")
    run = tmp_path / "R"
    (run / "rl" / "round-1").mkdir(parents=True)
    (run / "rl" / "comparisons.jsonl").write_text("".join(json.dumps(c) + "\n" for c in comps))
    cons = {"combine": "mean", "labelers": [
        {"labeler": n, "identity": n, "position_consistency": 1.0, "clear_accuracy": 0.75, "clear_count": 4,
         "weight": 1.0} for n in ("l0", "l1")], "agreement": agreement_report([list(r) for r in zip(x, y)], ["l0", "l1"])}
    (run / "rl" / "round-1" / "label_diagnostics.json").write_text(json.dumps(
        {"pairs": 4, "consensus": cons, "human_consensus": human_report}))
    lab = label_report(Run("R", run, {}), 2)
    assert [(d["prompt_id"], round(d["spread"], 6)) for d in lab["disagreements"]] == [("p1", 0.7), ("p2", 0.2), ("p0", 1.0)]
    assert lab["human_consensus"]["annotators"]["bo"]["labels"] == 1
    text = json.dumps(evaluator_blocks({"labels": {"R": lab}}))
    assert "l0" in text and "0.75" in text and "annotators" in text and "bo" in text and "Fleiss" in text


def test_label_report_shows_the_last_dpo_policys_implicit_reward_beside_the_pm(tmp_path):
    """A DPO run's clear-pair check (cai.train.dpo.clear_pair_check, saved in the policy's cai_train.json) is
    reported from the last DPO round that has a model, in the table beside the PM's."""
    from cai.compare import Run, label_report
    from cai.report import render_markdown, reward_check_blocks

    run = tmp_path / "R"

    def dpo_policy(where, accuracy):
        where.mkdir(parents=True)
        (where / "model.safetensors").write_bytes(b"")
        (where / "config.json").write_text("{}")
        (where / "cai_train.json").write_text(json.dumps({"clear_pairs": {
            "count": 40, "left_out": 0, "accuracy": accuracy, "mean_margin": 0.1,
            "by_category": {"harmless": {"count": 20, "accuracy": 0.9}, "helpful": {"count": 20, "accuracy": 0.4}},
            "by_length": {"better_longer": {"count": 20, "accuracy": 0.95}, "better_shorter": {"count": 20, "accuracy": 0.3}},
            "start_likelihood_accuracy": 0.55, "policy_likelihood_accuracy": 0.6}}))

    assert label_report(Run("R", tmp_path, {}))["dpo_clear_pairs"] is None
    dpo_policy(run / "rl" / "dpo" / "policy", 0.625)
    assert label_report(Run("R", run, {}))["dpo_clear_pairs"]["accuracy"] == 0.625
    dpo_policy(run / "rl" / "dpo" / "round-2" / "policy", 0.675)  # online DPO: its last round
    lab = label_report(Run("R", run, {}))
    assert lab["dpo_clear_pairs"]["accuracy"] == 0.675
    md = render_markdown(reward_check_blocks({"labels": {"R": lab, "S": {"pm_clear_pairs": None}}}))
    dpo_row = next(line for line in md.splitlines() if line.startswith("| R | DPO"))
    assert "| 0.68 | 40 | harmless 0.90, helpful 0.40 | better longer 0.95, better shorter 0.30 | 0.55 / 0.60 |" in dpo_row
    assert "| S | PM |" in md and "| S | DPO" not in md
